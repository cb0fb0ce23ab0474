"""The loss registry: a name in `LossConfig.type` picks a pure loss function from one table.

The table is the only place a loss name meets its code, so adding a loss is one enum member and
one row, and no trainer ever branches on the loss type.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from ropo_ray.losses.preference import (
    LossOutput,
    PreferenceLogps,
    dpo_loss,
    ipo_loss,
    rpo_loss,
    sft_loss,
    simpo_loss,
    spo_loss,
)

if TYPE_CHECKING:  # typing only: keeps the loss package free of the YAML loader
    from ropo_ray.config.schema import LossConfig

class LossType(StrEnum):
    """Names accepted by `LossConfig.type`."""

    DPO = "dpo"
    IPO = "ipo"
    RPO = "rpo"
    SPO = "spo"
    SIMPO = "simpo"
    SFT = "sft"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (so the reference pass / cache is needed)."""
        return LOSSES[self].needs_reference


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its pure function and whether it needs reference log-probs."""

    fn: Callable[[PreferenceLogps, LossConfig], LossOutput]
    needs_reference: bool


LOSSES: dict[LossType, LossSpec] = {
    LossType.DPO: LossSpec(dpo_loss, needs_reference=True),
    LossType.IPO: LossSpec(ipo_loss, needs_reference=True),
    LossType.RPO: LossSpec(rpo_loss, needs_reference=True),
    LossType.SPO: LossSpec(spo_loss, needs_reference=True),
    LossType.SIMPO: LossSpec(simpo_loss, needs_reference=False),
    LossType.SFT: LossSpec(sft_loss, needs_reference=False),
}


def get_loss(name: str) -> LossSpec:
    """The spec registered under `name`; an unknown name raises ValueError naming the nearest one."""
    valid = [t.value for t in LossType]
    if name not in valid:
        nearest = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ValueError(f"unknown loss {name!r}{hint} (valid: {', '.join(valid)})")
    return LOSSES[LossType(name)]


def compute_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """Per-pair losses and rewards of the loss named by `cfg.type`."""
    return get_loss(cfg.type).fn(logps, cfg)
