"""Learning-rate schedule shared by SFT and preference training: linear warmup, cosine decay to 0."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, floor: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine decay
    from 1 down to `floor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                            floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `warmup_cosine` with warmup = ratio * total steps (at least one step)."""
    warmup = max(1, int(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup, floor))
