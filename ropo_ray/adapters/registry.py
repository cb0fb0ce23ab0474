"""Adapters behind one interface: `attach(model, cfg) -> model` and `merge(model) -> plain model`.

- ropo: rotation + magnitude (ours, arXiv 2508.17637);
- lora / oft / boft: peft's implementations (arXiv 2106.09685, 2306.07280, 2311.06243), the baselines;
- full: every weight trains (full-weight DPO).
A merged model is a plain transformers model: `save_pretrained` gives a folder vLLM loads as is.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ropo_ray.adapters.inject import inject_ropo, merge_ropo
from ropo_ray.config.schema import AdapterConfig


def _target_regex(cfg: AdapterConfig) -> str:
    # peft full-matches a string target against the dotted module name.
    return rf".*(?:^|\.)(?:{'|'.join(cfg.target_modules)})"


def _peft_config(cfg: AdapterConfig):
    import peft  # peft pulls in much of transformers: import it only when a baseline is used.

    builders = {
        "lora": lambda: peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                        target_modules=_target_regex(cfg), bias="none"),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=cfg.oft_block_size, target_modules=_target_regex(cfg),
                                      module_dropout=0.0),
        "boft": lambda: peft.BOFTConfig(boft_block_size=cfg.oft_block_size,
                                        boft_n_butterfly_factor=cfg.boft_butterfly_factor,
                                        target_modules=_target_regex(cfg), boft_dropout=0.0),
    }
    return builders[cfg.type]()


def _attach_ropo(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    inject_ropo(model, cfg)
    return model


def _attach_peft(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    import peft

    return peft.get_peft_model(model, _peft_config(cfg))


def _merge_peft(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()


def _attach_full(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    model.requires_grad_(True)
    return model


@dataclass(frozen=True)
class AdapterSpec:
    """How to attach an adapter to a model, and how to fold it back into plain weights."""

    attach: Callable[[nn.Module, AdapterConfig], nn.Module]
    merge: Callable[[nn.Module], nn.Module]
    frozen_base: bool
    """True when the base weights stay frozen (the reference model is the step-0 policy)."""


ADAPTERS: dict[str, AdapterSpec] = {
    "ropo": AdapterSpec(_attach_ropo, merge_ropo, True),
    "lora": AdapterSpec(_attach_peft, _merge_peft, True),
    "oft": AdapterSpec(_attach_peft, _merge_peft, True),
    "boft": AdapterSpec(_attach_peft, _merge_peft, True),
    "full": AdapterSpec(_attach_full, lambda model: model, False),
}


def get_adapter(name: str) -> AdapterSpec:
    """The adapter registered under `name`; an unknown name is an error naming the nearest one."""
    if name not in ADAPTERS:
        near = difflib.get_close_matches(name, list(ADAPTERS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown adapter {name!r}{hint} (known: {', '.join(ADAPTERS)})")
    return ADAPTERS[name]


def attach_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Attach the configured adapter; afterwards only its parameters require grad."""
    return get_adapter(cfg.type).attach(model, cfg)


def merge_adapter(model: nn.Module, adapter_type: str) -> nn.Module:
    """Fold the adapter into plain weights; the result is a plain transformers model."""
    return get_adapter(adapter_type).merge(model)
