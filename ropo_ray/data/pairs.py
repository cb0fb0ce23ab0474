"""A preference pair as token ids: chat template, truncation policy and the content-hash pair_id.

Pure per-row functions: the Ray Data preparation maps them over batches, the local trainer and the
tests call them directly, so every path builds exactly the same ids.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ropo_ray.config.schema import DataConfig
from ropo_ray.data.tokenize import encode_completion, encode_prompt


class PairTooLong(ValueError):
    """The pair exceeds the token limits and the truncation policy is `reject`."""


def pair_id(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    """Content hash of the tokenised pair: the key of the reference-logprob cache."""
    h = hashlib.sha256()
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(ids).to_bytes(4, "little"))
        h.update(b"".join(i.to_bytes(4, "little") for i in ids))
    return h.hexdigest()[:32]


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], cfg: DataConfig,
                  bos_id: int | None) -> tuple[list[int], list[int], list[int]]:
    """Apply the truncation policy: keep the prompt's end (and its bos), cut the completions' end."""
    too_long = (len(prompt_ids) > cfg.max_prompt_tokens or len(chosen_ids) > cfg.max_completion_tokens
                or len(rejected_ids) > cfg.max_completion_tokens)
    if not too_long:
        return prompt_ids, chosen_ids, rejected_ids
    if cfg.truncation == "reject":
        raise PairTooLong(f"pair has {len(prompt_ids)} prompt / {len(chosen_ids)} chosen / {len(rejected_ids)} "
                          f"rejected tokens; limits {cfg.max_prompt_tokens} / {cfg.max_completion_tokens}")
    if len(prompt_ids) > cfg.max_prompt_tokens:
        keep_bos = bos_id is not None and prompt_ids[0] == bos_id
        tail = cfg.max_prompt_tokens - int(keep_bos)
        prompt_ids = ([bos_id] if keep_bos else []) + prompt_ids[len(prompt_ids) - tail:]
    return prompt_ids, chosen_ids[: cfg.max_completion_tokens], rejected_ids[: cfg.max_completion_tokens]


def tokenize_pair(tokenizer: Any, messages: list[dict], chosen: str, rejected: str, cfg: DataConfig) -> dict:
    """Prompt messages and two response texts -> ids, lengths and pair_id (raises PairTooLong)."""
    prompt_ids, chosen_ids, rejected_ids = truncate_pair(
        encode_prompt(tokenizer, messages), encode_completion(tokenizer, chosen),
        encode_completion(tokenizer, rejected), cfg, tokenizer.bos_token_id)
    return {
        "pair_id": pair_id(prompt_ids, chosen_ids, rejected_ids),
        "prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
    }


def is_eval_pair(pid: str, eval_fraction: float) -> bool:
    """Deterministic split by pair_id: the same pair is held out in every run and on every machine."""
    return int(pid[:8], 16) / 0x1_0000_0000 < eval_fraction

