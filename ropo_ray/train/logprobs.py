"""Summed completion log-probs of chosen and rejected from one concatenated forward (pure torch).

A pair is prompt_ids + completion_ids. Chosen and rejected sequences of a batch are stacked into
one [2B, T] batch (chosen first), right-padded, so the model runs once per step; only completion
tokens count (prompt and padding are masked out of the sums).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    """Right-pad token lists to [N, length] (default: the longest)."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                      ) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion sequences: input_ids, attention_mask, completion_mask, each [N, T];
    completion_mask is 1 on completion tokens."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    input_ids = pad_sequences(seqs, pad_id)  # [N, T]
    width = input_ids.shape[1]
    return {
        "input_ids": input_ids,
        "attention_mask": pad_sequences([[1] * len(s) for s in seqs], 0, width),  # [N, T]
        "completion_mask": pad_sequences(masks, 0, width),  # [N, T]
    }


def collate_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Token lists of B pairs -> the concatenated batch, [2B, T]: rows 0..B-1 are prompt+chosen,
    rows B..2B-1 prompt+rejected."""
    return collate_sequences(list(prompts) * 2, list(chosen) + list(rejected), pad_id)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: [N, T, V] logits, [N, T] ids -> [N, T-1] (fp32).

    gather - logsumexp instead of a full log_softmax: the [N, T, V] log-prob tensor is never stored.
    """
    logits = logits[:, :-1].float()  # [N, T-1, V]
    labels = input_ids[:, 1:]  # [N, T-1]
    picked = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs and completion token counts, each [N]."""
    mask = completion_mask[:, 1:].to(torch.float32)  # [N, T-1]: token t+1 is predicted at t
    per_token = token_logps(logits, input_ids) * mask
    return per_token.sum(-1), mask.sum(-1)


def concatenated_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward of the [2B, T] batch -> {chosen,rejected}_logps and {chosen,rejected}_lengths, each [B]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    sums, counts = sequence_logps(out.logits, batch["input_ids"], batch["completion_mask"])  # [2B]
    b = sums.shape[0] // 2
    return {
        "chosen_logps": sums[:b], "rejected_logps": sums[b:],
        "chosen_lengths": counts[:b], "rejected_lengths": counts[b:],
    }
