"""Preference losses (ROPO_SPEC section 3): pure torch functions and the registry that names them.

Light on purpose: importing this package loads torch only, never ray, deepspeed, vllm or transformers.
"""

from ropo_ray.losses.preference import (
    LossOutput,
    PreferenceLogps,
    dpo_loss,
    ipo_loss,
    preference_metrics,
    rpo_loss,
    sft_loss,
    simpo_loss,
    spo_loss,
)
from ropo_ray.losses.registry import LOSSES, LossSpec, LossType, compute_loss, get_loss

__all__ = [
    "LOSSES", "LossOutput", "LossSpec", "LossType", "PreferenceLogps", "compute_loss", "dpo_loss", "get_loss",
    "ipo_loss", "preference_metrics", "rpo_loss", "sft_loss", "simpo_loss", "spo_loss",
]
