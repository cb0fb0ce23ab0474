"""DeepSpeed config from our settings, and a user's JSON honoured with its "auto" values filled."""

from __future__ import annotations

import json

import pytest

from ropo_ray.config import ConfigError, load_config
from ropo_ray.train.ds_config import deepspeed_config
from ropo_ray.train.ray_trainer import total_steps


def test_built_config():
    tc = load_config(None, ["train.micro_batch_size=4", "train.grad_accum_steps=3", "train.zero_stage=3",
                            "train.offload_optimizer=true", "train.precision=bf16", "train.lr=0.02"]).train
    ds = deepspeed_config(tc, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2  # micro x accumulation x ranks, as DeepSpeed checks
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 0.02 and ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # the trainer passes the same warmup + cosine as the local loop


def test_offload_needs_a_zero_stage():
    ds = deepspeed_config(load_config(None, ["train.zero_stage=0", "train.offload_optimizer=true"]).train, 1)
    assert ds["zero_optimization"] == {"stage": 0}


def test_user_json_is_honoured_and_auto_filled(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
                                "zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupLR"}}))
    ds = deepspeed_config(load_config(None, [f"train.deepspeed_config={path}", "train.micro_batch_size=5"]).train, 4)
    assert ds == {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 2,
                  "zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupLR"}}


def test_user_json_errors_name_the_setting(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="train.deepspeed_config: .* not valid JSON"):
        deepspeed_config(load_config(None, [f"train.deepspeed_config={bad}"]).train, 1)
    unknown = tmp_path / "auto.json"
    unknown.write_text(json.dumps({"fp16": {"loss_scale": "auto"}}))
    with pytest.raises(ConfigError, match="loss_scale: auto"):
        deepspeed_config(load_config(None, [f"train.deepspeed_config={unknown}"]).train, 1)


def test_total_steps_by_hand():
    """100 pairs over 2 workers = 50 each; micro-batches of 8 -> ceil(50/8) = 7 per epoch; 3 epochs = 21
    micro-batches, accumulated by 2 -> 10 optimizer steps; max_steps=4 caps it."""
    cfg = load_config(None, ["train.num_workers=2", "train.micro_batch_size=8", "train.epochs=3",
                             "train.grad_accum_steps=2"])
    assert total_steps(100, cfg) == 10
    assert total_steps(100, load_config(None, ["train.num_workers=2", "train.micro_batch_size=8", "train.epochs=3",
                                                "train.grad_accum_steps=2", "train.max_steps=4"])) == 4
    with pytest.raises(ValueError, match="cannot be split"):
        total_steps(1, cfg)
