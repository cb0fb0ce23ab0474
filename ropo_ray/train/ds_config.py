"""DeepSpeed configuration from our typed config (or the user's JSON, honoured), pure Python.

The learning-rate schedule is not put here: the trainer hands DeepSpeed the same warmup + cosine
LambdaLR the single-process loop uses (DeepSpeed saves and restores its state with the engine),
unless the user's JSON brings its own "scheduler".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ropo_ray.config.schema import ConfigError, TrainConfig


def _fill_auto(node: Any, values: dict[str, Any]) -> Any:
    """Replace each "auto" leaf by the value of the same key from `values` (HF-style auto configs)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if value == "auto":
            if key not in values:
                raise ConfigError(f"train.deepspeed_config: no value to fill '{key}: auto' with")
            out[key] = values[key]
        else:
            out[key] = _fill_auto(value, values)
    return out


def deepspeed_config(tc: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `world_size` data-parallel ranks."""
    batch = tc.micro_batch_size * tc.grad_accum_steps * world_size
    optimizer_params = {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
                        "torch_adam": True}
    values = {"train_micro_batch_size_per_gpu": tc.micro_batch_size, "gradient_accumulation_steps": tc.grad_accum_steps,
              "train_batch_size": batch, "gradient_clipping": tc.max_grad_norm, "stage": tc.zero_stage,
              **optimizer_params}
    if tc.deepspeed_config:
        path = Path(tc.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: {path} does not exist")
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({err})") from None
        return _fill_auto(user, values)
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer and tc.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "train_batch_size": batch,
        "gradient_clipping": tc.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": tc.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
