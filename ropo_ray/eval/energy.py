"""Hyperspherical energy of a layer's neurons (ROPO_SPEC.md section 4).

    HE(W) = sum_{i != j} 1 / ||w^_i - w^_j||,   w^_i = w_i / ||w_i||   (rows of W [n, d])

RoPO (arXiv 2508.17637) ties DPO's reward hacking to "neuron collapse", a rise of HE relative to the
SFT model; a rotation R keeps every pairwise angle (||w^_i R^T - w^_j R^T|| = ||w^_i - w^_j||) and the
magnitude m does not enter, so under RoPO the change is ~0, while full-weight updates move it.
Computed in fp32 and in row chunks, so wide layers never form the n x n matrix at once.
"""

from __future__ import annotations

import torch
from torch import nn


def hyperspherical_energy(weight: torch.Tensor, chunk: int = 1024, eps: float = 1e-12) -> float:
    """HE of the rows of `weight` [n, d]; coincident directions count at distance eps."""
    w = weight.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)  # [n, d]
    n = w.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, chunk):
        block = w[start:start + chunk]  # [c, d]
        dist = torch.cdist(block, w).clamp_min(eps)  # [c, n]
        rows = torch.arange(block.shape[0])
        dist[rows, rows + start] = float("inf")  # drop i == j
        total += dist.reciprocal().sum(dtype=torch.float64)
    return float(total)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly adapted) linear layer computes with: merged for RoPO, plain otherwise."""
    merged = getattr(module, "merged_weight", None)
    return merged() if callable(merged) else module.weight


def layer_energies(model: nn.Module, names: list[str]) -> dict[str, float]:
    """HE of each named linear layer's effective weight."""
    with torch.no_grad():
        return {name: hyperspherical_energy(effective_weight(model.get_submodule(name))) for name in names}
