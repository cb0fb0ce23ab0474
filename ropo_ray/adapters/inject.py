"""Put RoPO layers into a model by module-name patterns, report what trains, and merge for export."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from torch import nn

from ropo_ray.adapters.ropo_linear import RoPOLinear, release_untracked, share_rotations
from ropo_ray.config.schema import AdapterConfig

logger = logging.getLogger(__name__)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern (a regular expression) matches the end of the dotted module name."""
    return any(re.search(rf"(?:^|\.)(?:{p})$", name) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_ropo(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze every weight, wrap each matching `nn.Linear` in a RoPOLinear; return the wrapped names.

    Raises when no module matches, since an adapter that adapts nothing trains nothing. Each forward of `model`
    computes the rotations of all its layers together first (ropo_linear.share_rotations).
    """
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and name_matches(n, cfg.target_modules)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"adapter.target_modules={list(cfg.target_modules)} matched no nn.Linear; "
                         f"linear layers here end in: {linear}")
    for name in names:
        base = model.get_submodule(name)
        wrapped = RoPOLinear(base, cfg.block_sizes, cfg.mixing, cfg.cayley, cfg.neumann_terms, cfg.learn_magnitude,
                             cfg.kernel)
        _set_submodule(model, name, wrapped)
    if not getattr(model, "_ropo_shares_rotations", False):  # one batched rotation computation per forward
        model.register_forward_pre_hook(_share_before_forward)
        model.register_forward_hook(_release_after_forward)
        model._ropo_shares_rotations = True
    native_layers = sum(model.get_submodule(n).uses_native_kernel for n in names)
    if cfg.kernel == "auto" and native_layers < len(names):
        from ropo_ray.adapters import native

        ok, why = native.available()
        reason = why if not ok else f"mixing={cfg.mixing!r} is not banded in every layer"
        logger.warning("RoPO: %d of %d layers apply the rotation with torch block matmuls, not the native "
                       "band kernel (%s)", len(names) - native_layers, len(names), reason)
    else:
        kind = "native band" if native_layers else "torch"
        logger.info("RoPO: %d layers, rotation by the %s kernel", len(names), kind)
    return names


def _share_before_forward(model: nn.Module, _args: tuple) -> None:
    share_rotations(list(ropo_layers(model).values()))


def _release_after_forward(model: nn.Module, _args: tuple, _output: object) -> None:
    release_untracked(list(ropo_layers(model).values()))


def ropo_layers(model: nn.Module) -> dict[str, RoPOLinear]:
    """Every RoPO layer of the model by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RoPOLinear)}


def merge_ropo(model: nn.Module) -> nn.Module:
    """Replace every RoPOLinear by the plain `nn.Linear` it computes (in place); returns the model."""
    for name, layer in ropo_layers(model).items():
        _set_submodule(model, name, layer.merged_linear())
    return model


def trainable_report(model: nn.Module) -> dict[str, float]:
    """Trainable parameters: count, the base model's size, and the percentage papers report.

    `trainable` counts parameters that can change the model (a RoPO tail block's masked entries are
    not counted); `base` counts the parameters of the model without any adapter.
    """
    ropo = ropo_layers(model)
    adapter_ids = {id(p) for layer in ropo.values() for p in (layer.magnitude, *layer.rotation)}
    trainable = sum(layer.num_free_params() for layer in ropo.values())
    trainable += sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids)
    peft_extra = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "oft_" in n or "boft_" in n)
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids) - peft_extra
    return {"trainable": trainable, "base": base, "percent": 100.0 * trainable / max(base, 1)}
