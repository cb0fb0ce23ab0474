"""Completion log-probs from one concatenated forward: masking of prompt and padding."""

from __future__ import annotations

import math

import torch

from ropo_ray.train.logprobs import collate_pairs, concatenated_forward, sequence_logps


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
    for i in range(2):
        for key, resp in (("chosen", chosen[i]), ("rejected", rejected[i])):
            seq = torch.tensor([prompts[i] + resp])
            logp = torch.log_softmax(tiny_llama(seq).logits[0].double(), -1)
            start = len(prompts[i])
            expected = sum(logp[t - 1, seq[0, t]].item() for t in range(start, seq.shape[1]))
            assert math.isclose(out[f"{key}_logps"][i].item(), expected, abs_tol=1e-4), (i, key)
            assert out[f"{key}_lengths"][i].item() == len(resp)
