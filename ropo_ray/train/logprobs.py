"""Summed completion log-probs of chosen and rejected from one forward per batch (pure torch).

A pair is prompt_ids + completion_ids. Two layouts give the same log-probs:

- concatenated: chosen and rejected sequences are stacked into one [2B, T] batch (chosen first),
  right-padded; only completion tokens count (prompt and padding are masked out of the sums).
- shared prompt: each pair is one row [prompt | chosen | rejected] with its own attention mask (the
  rejected tokens see the prompt and themselves, never the chosen ones) and position ids (both
  completions start at the prompt's length), so the prompt runs once per pair instead of twice.
  Prefix sharing for preference training: arXiv 2410.20305 (Wang and Hegde, 2024), section 3.
  On issue 8's benchmark pairs (61-token prompts, 18- and 10-token completions) a pair is 89 tokens
  instead of 150.
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


def padded_width(longest: int, multiple: int) -> int:
    """`longest` rounded up to a multiple of `multiple`: batches then come in few distinct shapes, and oneDNN
    builds (and keeps) kernels for each shape it meets (BENCHMARKS.md, session 18)."""
    return -(-longest // multiple) * multiple


def collate_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                      pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion sequences: input_ids, attention_mask, completion_mask, each [N, T];
    completion_mask is 1 on completion tokens. T is the longest rounded up to a multiple of `pad_multiple`."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    input_ids = pad_sequences(seqs, pad_id, padded_width(max(len(s) for s in seqs), pad_multiple))  # [N, T]
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
    pad_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Token lists of B pairs -> the concatenated batch, [2B, T]: rows 0..B-1 are prompt+chosen,
    rows B..2B-1 prompt+rejected."""
    return collate_sequences(list(prompts) * 2, list(chosen) + list(rejected), pad_id, pad_multiple)


def collate_shared(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                   rejected: Sequence[Sequence[int]], pad_id: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Token lists of B pairs -> the shared-prompt batch: one row per pair, [prompt | chosen | rejected],
    right-padded to the longest rounded up to a multiple of `pad_multiple` (L).

    input_ids, position_ids, attention_mask [B, L] (1 on real tokens, as in the concatenated layout: what
    token counts read; the model gets the 4D mask); allowed [B, L, L] (bool: query i may attend key j); for each
    completion, {chosen,rejected}_from / _labels / _mask [B, C]: the position whose logits predict
    each completion token, the token, and 1 where there is one. A token at layout position t is predicted
    at t - 1, except the first rejected token, predicted at the prompt's last position (as in its own
    sequence prompt + rejected). With an empty prompt the first token of each completion has no
    prediction, as in the concatenated layout."""
    rows = len(prompts)
    width = padded_width(max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)), pad_multiple)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segment = torch.full((rows, width), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    out = {}
    for name, completions in (("chosen", chosen), ("rejected", rejected)):
        longest = max(1, max(len(c) for c in completions))
        out[f"{name}_from"] = torch.zeros((rows, longest), dtype=torch.long)
        out[f"{name}_labels"] = torch.zeros((rows, longest), dtype=torch.long)
        out[f"{name}_mask"] = torch.zeros((rows, longest), dtype=torch.float32)
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        n_p, n_c, n_r = len(p), len(c), len(r)
        input_ids[i, : n_p + n_c + n_r] = torch.as_tensor([*p, *c, *r], dtype=torch.long)
        position_ids[i, : n_p + n_c + n_r] = torch.cat(
            [torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_r)])
        segment[i, :n_p], segment[i, n_p:n_p + n_c], segment[i, n_p + n_c:n_p + n_c + n_r] = 0, 1, 2
        for name, tokens, start in (("chosen", c, n_p), ("rejected", r, n_p + n_c)):
            frm = torch.arange(start - 1, start - 1 + len(tokens))
            if len(tokens):
                frm[0] = n_p - 1  # the first token of either completion is predicted from the prompt's end
            out[f"{name}_from"][i, : len(tokens)] = frm.clamp(min=0)
            out[f"{name}_labels"][i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            out[f"{name}_mask"][i, : len(tokens)] = 1.0
            if n_p == 0 and len(tokens):
                out[f"{name}_mask"][i, 0] = 0.0
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]  # [B, L, 1], [B, 1, L]
    allowed = causal & (q != 3) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no row is all masked
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": (segment != 3).long(),
            "allowed": allowed, **out}


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label under its logits: [N, T, V], [N, T] -> [N, T] (fp32).

    gather - logsumexp instead of a full log_softmax: the [N, T, V] log-prob tensor is never stored.
    """
    logits = logits.float()
    return torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: [N, T, V] logits, [N, T] ids -> [N, T-1] (fp32)."""
    return label_logps(logits[:, :-1], input_ids[:, 1:])


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs and completion token counts, each [N]."""
    mask = completion_mask[:, 1:].to(torch.float32)  # [N, T-1]: token t+1 is predicted at t
    per_token = token_logps(logits, input_ids) * mask
    return per_token.sum(-1), mask.sum(-1)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's activations are in (its input embeddings'); a DeepSpeed engine's module's."""
    return getattr(model, "module", model).get_input_embeddings().weight.dtype


def additive_mask_of(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: the query may see the key) as the additive mask attention adds to its
    scores: 0 where allowed, the dtype's minimum elsewhere (transformers' eager mask)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)


def shared_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward of the shared-prompt batch (`collate_shared`) -> the same dict as `concatenated_forward`.

    The mask goes to the model as a 4D additive mask [B, 1, L, L] in its compute dtype (0 where allowed,
    the dtype's minimum elsewhere), which transformers' eager and SDPA attention apply as given."""
    mask = additive_mask_of(batch["allowed"], compute_dtype(model))
    out = model(input_ids=batch["input_ids"], attention_mask=mask[:, None], position_ids=batch["position_ids"],
                use_cache=False)
    logits = out.logits  # [B, L, V]
    result = {}
    for name in ("chosen", "rejected"):
        frm = batch[f"{name}_from"]  # [B, C]
        picked = torch.gather(logits, 1, frm[:, :, None].expand(-1, -1, logits.shape[-1]))  # [B, C, V]
        per_token = label_logps(picked, batch[f"{name}_labels"])  # [B, C]
        mask = batch[f"{name}_mask"]
        result[f"{name}_logps"], result[f"{name}_lengths"] = (per_token * mask).sum(-1), mask.sum(-1)
    return result


def policy_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Completion log-probs of a batch in either layout (a shared-prompt batch has `allowed`)."""
    return shared_forward(model, batch) if "allowed" in batch else concatenated_forward(model, batch)


def concatenated_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward of the [2B, T] batch -> {chosen,rejected}_logps and {chosen,rejected}_lengths, each [B]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    sums, counts = sequence_logps(out.logits, batch["input_ids"], batch["completion_mask"])  # [2B]
    b = sums.shape[0] // 2
    return {
        "chosen_logps": sums[:b], "rejected_logps": sums[b:],
        "chosen_lengths": counts[:b], "rejected_lengths": counts[b:],
    }
