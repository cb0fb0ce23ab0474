"""Completion log-probs from one concatenated forward: masking of prompt and padding."""

from __future__ import annotations

import math

import pytest
import torch

from ropo_ray.train.logprobs import collate_pairs, collate_shared, concatenated_forward, sequence_logps, shared_forward
from tests.conftest import assert_matches_separate_forwards, make_tiny_llama


def test_collate_layout():
    batch = collate_pairs(prompts=[[1, 2], [3]], chosen=[[4, 5], [6]], rejected=[[7], [8, 9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5], [3, 6, 0, 0], [1, 2, 7, 0], [3, 8, 9, 10]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_sequence_logps_by_hand():
    """Vocab 2, logits 0 everywhere except position 1 where token 1 has logit ln 3.
    Sequence [0, 0, 1] with completion = last two tokens:
      token at index 1 (0) predicted at position 0: p = 1/2 -> ln 0.5
      token at index 2 (1) predicted at position 1: p = 3/4 -> ln 0.75
    sum = ln 0.375 = -0.980829..., count 2."""
    logits = torch.zeros(1, 3, 2)
    logits[0, 1, 1] = math.log(3.0)
    ids = torch.tensor([[0, 0, 1]])
    sums, counts = sequence_logps(logits, ids, torch.tensor([[0, 1, 1]]))
    assert math.isclose(sums.item(), math.log(0.375), rel_tol=1e-6)
    assert counts.item() == 2
    # the prompt token is excluded: masking it out drops ln 0.5
    sums, _ = sequence_logps(logits, ids, torch.tensor([[0, 0, 1]]))
    assert math.isclose(sums.item(), math.log(0.75), rel_tol=1e-6)


def test_concatenated_forward_matches_separate_unpadded_forwards(tiny_llama):
    """Each pair's logps equal those of its own unpadded sequence, scored with log_softmax token by token."""
    prompts, chosen, rejected = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], [[11], [12, 13]]
    out = concatenated_forward(tiny_llama, collate_pairs(prompts, chosen, rejected, pad_id=0))
    assert_matches_separate_forwards(tiny_llama, out, prompts, chosen, rejected)


def test_shared_layout_by_hand():
    """Pair 0: prompt [1, 2], chosen [4, 5], rejected [7]; pair 1: prompt [3], chosen [6], rejected [8, 9, 10]."""
    b = collate_shared(prompts=[[1, 2], [3]], chosen=[[4, 5], [6]], rejected=[[7], [8, 9, 10]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 4, 5, 7], [3, 6, 8, 9, 10]]
    # both completions continue the prompt: positions restart at the prompt's length for the rejected one
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 3]]
    # chosen token j sits at P + j and is predicted at P + j - 1; rejected token 0 from the prompt's end
    assert b["chosen_from"].tolist() == [[1, 2], [0, 0]] and b["chosen_labels"].tolist() == [[4, 5], [6, 0]]
    assert b["chosen_mask"].tolist() == [[1, 1], [1, 0]]
    assert b["rejected_from"].tolist() == [[1, 0, 0], [0, 2, 3]]
    assert b["rejected_labels"].tolist() == [[7, 0, 0], [8, 9, 10]]
    assert b["rejected_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    # pair 0: the rejected token (position 4) sees the prompt (0, 1) and itself, not the chosen (2, 3)
    assert b["allowed"][0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                              [1, 1, 0, 0, 1]]
    b = collate_shared(prompts=[[1], [3, 4, 5]], chosen=[[2], [6]], rejected=[[7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 7, 0, 0], [3, 4, 5, 6, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # padding attends only to itself (no row of the mask is empty), and nothing attends to padding
    assert b["allowed"][0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                                              [0, 0, 0, 0, 1]]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_forward_matches_separate_unpadded_forwards(attention):
    """The shared layout's logps equal each pair's own unpadded sequences' (and the concatenated layout's),
    with transformers' eager and SDPA attention."""
    model = make_tiny_llama()
    model.config._attn_implementation = attention  # noqa: SLF001 (transformers' own switch)
    prompts, chosen, rejected = [[1, 2, 3], [4], [5, 6]], [[5, 6], [7, 8, 9, 10], [11]], [[11], [12, 13], [14, 15, 16]]
    out = shared_forward(model, collate_shared(prompts, chosen, rejected, pad_id=0))
    concatenated = concatenated_forward(model, collate_pairs(prompts, chosen, rejected, pad_id=0))
    assert_matches_separate_forwards(model, out, prompts, chosen, rejected)
    for key in out:
        assert torch.allclose(out[key], concatenated[key], atol=1e-4), key


def test_shared_prompt_gradients_match_the_concatenated_layout():
    """Training through the shared layout moves the weights as the concatenated layout does."""
    prompts, chosen, rejected = [[1, 2, 3], [4, 5]], [[5, 6], [7, 8, 9]], [[11], [12, 13]]
    grads = []
    for batch, forward in ((collate_pairs(prompts, chosen, rejected, 0), concatenated_forward),
                           (collate_shared(prompts, chosen, rejected, 0), shared_forward)):
        model = make_tiny_llama()
        out = forward(model, batch)
        (out["chosen_logps"] - 2 * out["rejected_logps"]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_padding_to_a_multiple_changes_shapes_not_logps():
    """Widths 5 (shared) and 4 (stacked) pad to 8 with pad_multiple=8; the extra padding changes no log-prob."""
    model = make_tiny_llama()
    prompts, chosen, rejected = [[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9, 10]]
    shared = collate_shared(prompts, chosen, rejected, pad_id=0, pad_multiple=8)
    stacked = collate_pairs(prompts, chosen, rejected, pad_id=0, pad_multiple=8)
    assert shared["input_ids"].shape == (2, 8) and stacked["input_ids"].shape == (4, 8)
    assert shared["input_ids"][:, 5:].eq(0).all() and shared["attention_mask"].sum().item() == 10
    assert collate_shared(prompts, chosen, rejected, pad_id=0, pad_multiple=5)["input_ids"].shape == (2, 5)
    tight = shared_forward(model, collate_shared(prompts, chosen, rejected, pad_id=0))
    for out in (shared_forward(model, shared), concatenated_forward(model, stacked)):
        for key in tight:
            assert torch.allclose(out[key], tight[key], atol=1e-4), key
