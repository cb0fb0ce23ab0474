"""The reference cache's scoring: batches packed by token budget in the trainer's layout, and log-probs that
equal each pair's own unpadded forward in either layout."""

from __future__ import annotations

import pytest

from ropo_ray.refcache.compute import pair_width, reference_logps
from ropo_ray.refcache.stage import token_budget_batches
from tests.conftest import assert_matches_separate_forwards


def pair(prompt: int, chosen: int, rejected: int, tag: int = 0) -> dict:
    return {"prompt_ids": [1] * prompt, "chosen_ids": [2] * chosen, "rejected_ids": [3] * rejected, "tag": tag}


def test_pair_width_by_layout():
    row = pair(5, 3, 7)
    assert pair_width(row) == 12  # stacked: two rows of prompt + the longer completion
    assert pair_width(row, shared_prompt=True) == 15  # one row: prompt, chosen, rejected


def test_token_budget_batches_by_hand():
    """Widths stacked / shared: a (2, 2, 2) -> 4 / 6, b (2, 4, 1) -> 6 / 7, c (4, 4, 4) -> 8 / 12.
    Stacked, budget 24 (each pair two rows): [a] then a + b = 2 x 6 x 2 = 24 fits, a + b + c = 2 x 8 x 3 = 48
    does not; [c] alone. Shared, budget 24 (one row each): a + b = 7 x 2 = 14 fits, + c = 12 x 3 = 36 does
    not. A pair wider than the budget still gets a batch of its own."""
    a, b, c = pair(2, 2, 2, 0), pair(2, 4, 1, 1), pair(4, 4, 4, 2)
    tags = lambda batches: [[r["tag"] for r in batch] for batch in batches]  # noqa: E731
    assert tags(token_budget_batches([c, b, a], 24)) == [[0, 1], [2]]
    assert tags(token_budget_batches([c, b, a], 24, shared_prompt=True)) == [[0, 1], [2]]
    assert tags(token_budget_batches([c, b, a], 36, shared_prompt=True)) == [[0, 1, 2]]
    assert tags(token_budget_batches([c, b, a], 36)) == [[0, 1], [2]]  # 2 x 8 x 3 = 48 > 36
    assert tags(token_budget_batches([c, b, a], 5, shared_prompt=True)) == [[0], [1], [2]]


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_reference_logps_equal_separate_forwards_in_input_order(tiny_llama, shared_prompt):
    rows = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13, 14, 15]},
            {"prompt_ids": [20], "chosen_ids": [21, 22, 23], "rejected_ids": [24]},
            {"prompt_ids": [30, 31], "chosen_ids": [32], "rejected_ids": [33, 34]}]
    shapes = []
    hook = tiny_llama.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                with_kwargs=True)
    out = reference_logps(tiny_llama, rows, pad_id=0, batch_size=2, shared_prompt=shared_prompt)
    hook.remove()
    # widths stacked 9, 4, 4 and shared 11, 5, 5: batches [row 1, row 2], [row 0]; a pair is one row when shared
    assert shapes == ([(2, 5), (1, 11)] if shared_prompt else [(4, 4), (2, 9)])
    # in input order, though scored in width order, in padded batches
    as_batch = {"chosen_logps": [r["ref_chosen_logps"] for r in out],
                "rejected_logps": [r["ref_rejected_logps"] for r in out],
                "chosen_lengths": [r["chosen_tokens"] for r in out],
                "rejected_lengths": [r["rejected_tokens"] for r in out]}
    assert_matches_separate_forwards(tiny_llama, as_batch, [r["prompt_ids"] for r in rows],
                                     [r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows])
