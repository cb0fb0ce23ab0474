"""Load and save HF model folders safely: safetensors only, no remote code unless asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ropo_ray.config.schema import ConfigError, ModelConfig

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_model_folder(path: str | Path, cfg: ModelConfig) -> Path:
    """Refuse, before any loading, a folder without safetensors or with only pickle weights."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path: {folder} is not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)]
        if not pickled:
            raise ConfigError(f"model.path: {folder} holds no *.safetensors weights")
        if not cfg.allow_pickle_weights:
            raise ConfigError(f"model.path: {folder} has only pickle-based weights ({', '.join(pickled)}); "
                              "convert them to safetensors or set model.allow_pickle_weights=true")
    return folder


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> Any:
    """The tokenizer; it must carry a chat template (the pairs are templated with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.tokenizer_path: the tokenizer at {path} has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(cfg: ModelConfig, bf16: bool, gpu: bool) -> str | None:
    """The attention kernel to load the model with; None leaves transformers' default (SDPA).

    `model.attn_implementation=auto` picks "eager" when the model computes in bf16 on the CPU: on the
    Zen 4 machines PyTorch's CPU flash-attention backward in bf16 took 3.7x its fp32 time, and the RoPO
    bf16 training step ran at 6.3 pairs/s with it against 7.5 with eager attention (BENCHMARKS.md,
    training step). In fp32, and on GPUs, SDPA is kept.
    """
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if bf16 and not gpu else None


def load_model(path: str | Path, cfg: ModelConfig, *, bf16: bool = False, gpu: bool = False) -> nn.Module:
    """A causal LM from a checked folder, in the configured dtype, in eval mode.

    `bf16`: the caller computes in bf16 (train.precision=bf16) even if the weights load in fp32; with
    `gpu` it picks the attention kernel (`attention_implementation`).
    """
    from transformers import AutoModelForCausalLM

    folder = check_model_folder(path, cfg)
    attention = attention_implementation(cfg, bf16 or cfg.dtype == "bfloat16", gpu)
    # use_safetensors=True makes transformers refuse pickle files; when they are allowed, weights_only
    # keeps torch.load to tensors (a pickle that would run code is refused, never executed).
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
        use_safetensors=not cfg.allow_pickle_weights or None, weights_only=True,
        **({"attn_implementation": attention} if attention else {}),
    )
    return model.eval()


def save_model_folder(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) of a plain model plus its tokenizer: a folder vLLM loads as is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
