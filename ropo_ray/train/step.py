"""The math of one preference step, torch only: shared by the local loop, the Ray Train workers and tests.

batch rows -> one forward of chosen + rejected (concatenated, or sharing each pair's prompt) -> loss from the
registry -> metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ropo_ray.config.schema import LossConfig
from ropo_ray.losses.preference import PreferenceLogps, preference_metrics
from ropo_ray.losses.registry import compute_loss, get_loss
from ropo_ray.train.logprobs import collate_pairs, collate_shared, policy_logps


def make_batch(rows: Sequence[dict], pad_id: int, shared_prompt: bool = False, pad_multiple: int = 1
               ) -> dict[str, torch.Tensor]:
    """Rows with prompt_ids / chosen_ids / rejected_ids (+ cached ref_*_logps) -> a [2B, T] batch, or with
    `shared_prompt` one row per pair that runs its prompt once (`collate_shared`); T a multiple of
    `pad_multiple`."""
    collate = collate_shared if shared_prompt else collate_pairs
    batch = collate([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows],
                    [r["rejected_ids"] for r in rows], pad_id, pad_multiple)
    if "ref_chosen_logps" in rows[0]:
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    return batch


def preference_step(model: nn.Module, batch: dict[str, torch.Tensor], loss_cfg: LossConfig
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the batch (differentiable) and the metrics of ROPO_SPEC section 3."""
    spec = get_loss(loss_cfg.type)
    if spec.needs_reference and "ref_chosen_logps" not in batch:
        raise ValueError(f"loss {loss_cfg.type!r} needs reference log-probs, and the batch has none")
    out = policy_logps(model, batch)
    logps = PreferenceLogps(
        policy_chosen_logps=out["chosen_logps"], policy_rejected_logps=out["rejected_logps"],
        chosen_lengths=out["chosen_lengths"], rejected_lengths=out["rejected_lengths"],
        ref_chosen_logps=batch.get("ref_chosen_logps"), ref_rejected_logps=batch.get("ref_rejected_logps"),
    )
    result = compute_loss(logps, loss_cfg)
    return result.losses.mean(), preference_metrics(result, logps)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, rows: Sequence[dict], pad_id: int, loss_cfg: LossConfig,
                   batch_size: int = 32, shared_prompt: bool = False, pad_multiple: int = 1) -> dict[str, float]:
    """Held-out metrics, pair-weighted over all rows: eval/loss, eval/rewards/accuracies, ..."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        _, metrics = preference_step(model, make_batch(chunk, pad_id, shared_prompt, pad_multiple), loss_cfg)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * len(chunk)
    model.train(was_training)
    return {f"eval/{k}": v / len(rows) for k, v in totals.items()}
