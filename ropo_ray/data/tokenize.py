"""Tokenisation as pure per-row functions: the one construction of a training sequence.

A sequence is always `encode_prompt(messages) + encode_completion(response)`. The SFT run, the
reference-logprob cache and the preference training all build it this way, so the token ids a
log-prob is computed over are identical everywhere (a cached reference log-prob is only valid for
exactly the ids it was computed on).

Why not `apply_chat_template` on prompt + response together: BPE merges across the boundary could
differ from the prompt's own encoding, and the completion mask would then be off by a token. Here
the prompt ends with the template's "<|assistant|>\\n" and the completion is encoded on its own.
"""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Chat-templated prompt ending with the assistant header; exactly one bos (from the template)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    """The response's tokens (no special tokens added), then eos: the model learns where to stop."""
    return list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]


def encode_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a single-turn example with user text `prompt`."""
    return encode_prompt(tokenizer, [{"role": "user", "content": prompt}]), encode_completion(tokenizer, response)
