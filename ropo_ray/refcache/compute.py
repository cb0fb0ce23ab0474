"""Reference log-probs of tokenised pairs (torch only): the numbers the cache stores.

Pairs are scored in length-sorted batches so little compute is spent on padding, through
`concatenated_forward`. The trainer computes the same log-probs (its shared-prompt layout by default,
`ropo_ray.train.logprobs`), so at step 0 a RoPO policy reproduces them: the held-out loss is ln 2 within
1e-5 in float32 (tests/integration/test_ray_train.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ropo_ray.train.logprobs import collate_pairs, concatenated_forward


def pair_width(row: dict) -> int:
    """Length of a pair's longer sequence: in the concatenated [2B, T] batch the pair occupies 2 x width."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


@torch.no_grad()
def reference_logps(model: nn.Module, rows: Sequence[dict], pad_id: int, batch_size: int = 32
                    ) -> list[dict[str, float]]:
    """For each row (prompt_ids, chosen_ids, rejected_ids), in input order:
    ref_chosen_logps, ref_rejected_logps (fp32 sums) and the completion token counts."""
    order = sorted(range(len(rows)), key=lambda i: pair_width(rows[i]))
    out: list[dict[str, float]] = [{} for _ in rows]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_pairs([rows[i]["prompt_ids"] for i in idx], [rows[i]["chosen_ids"] for i in idx],
                              [rows[i]["rejected_ids"] for i in idx], pad_id)
        res = concatenated_forward(model, batch)
        for j, i in enumerate(idx):
            out[i] = {
                "ref_chosen_logps": float(res["chosen_logps"][j]),
                "ref_rejected_logps": float(res["rejected_logps"][j]),
                "chosen_tokens": int(res["chosen_lengths"][j]),
                "rejected_tokens": int(res["rejected_lengths"][j]),
            }
    return out
