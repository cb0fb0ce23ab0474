"""Reference log-probs of tokenised pairs (torch only): the numbers the cache stores.

Pairs are scored in length-sorted batches so little compute is spent on padding, in the trainer's layout
(`ropo_ray.train.logprobs`): with `shared_prompt` (train.shared_prompt, the default) one row per pair,
[prompt | chosen | rejected], so each prompt runs once (arXiv 2410.20305); else chosen and rejected stacked,
each pair taking two rows. Both layouts give the same log-probs up to rounding (tests/unit/test_refcache_compute.py),
so the cache's key does not depend on the layout, and at step 0 a RoPO policy reproduces the cached numbers:
the held-out loss is ln 2 within 1e-5 in float32 (tests/integration/test_ray_train.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ropo_ray.train.logprobs import collate_pairs, collate_shared, policy_logps


def pair_width(row: dict, shared_prompt: bool = False) -> int:
    """Tokens wide a pair's rows are: with `shared_prompt` its one row, prompt + chosen + rejected; else the
    prompt plus the longer completion (the width of each of its two rows)."""
    prompt, chosen, rejected = len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])
    return prompt + chosen + rejected if shared_prompt else prompt + max(chosen, rejected)


def rows_per_pair(shared_prompt: bool) -> int:
    """Batch rows a pair takes: one in the shared-prompt layout, two (chosen, rejected) stacked."""
    return 1 if shared_prompt else 2


@torch.no_grad()
def reference_logps(model: nn.Module, rows: Sequence[dict], pad_id: int, batch_size: int = 32,
                    shared_prompt: bool = False) -> list[dict[str, float]]:
    """For each row (prompt_ids, chosen_ids, rejected_ids), in input order:
    ref_chosen_logps, ref_rejected_logps (fp32 sums) and the completion token counts."""
    order = sorted(range(len(rows)), key=lambda i: pair_width(rows[i], shared_prompt))
    collate = collate_shared if shared_prompt else collate_pairs
    out: list[dict[str, float]] = [{} for _ in rows]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        res = policy_logps(model, collate([rows[i]["prompt_ids"] for i in idx], [rows[i]["chosen_ids"] for i in idx],
                                          [rows[i]["rejected_ids"] for i in idx], pad_id))
        for j, i in enumerate(idx):
            out[i] = {
                "ref_chosen_logps": float(res["chosen_logps"][j]),
                "ref_rejected_logps": float(res["rejected_logps"][j]),
                "chosen_tokens": int(res["chosen_lengths"][j]),
                "rejected_tokens": int(res["rejected_lengths"][j]),
            }
    return out
