"""Configuration of what a run starts from: the built-in task, the preference data, the reference model and
the reference-log-prob cache (see schema.py for the conventions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ropo_ray.config.checks import check


@dataclass(frozen=True)
class TaskConfig:
    """The built-in task (the embedded default): generated data and the tiny SFT model."""

    seed: int = 0
    """Seed of everything generated: facts, problems, pairs, splits, model init."""
    num_entities: int = 48
    """Invented entities in the knowledge base (each has a home town and a hat colour)."""
    max_operand: int = 20
    """Arithmetic operands are drawn from [0, max_operand)."""
    num_sft_examples: int = 6000
    """Arithmetic examples in the SFT corpus (answers in several phrasings); the facts come on top."""
    sft_filler_prob: float = 0.2
    """Probability that an SFT arithmetic answer is wrapped in filler, so the SFT model can produce
    filler and preference training can push it up."""
    fact_repeats: int = 6
    """Copies of each fact statement (entity x attribute x phrasing) in the SFT corpus."""
    num_pairs: int = 1200
    """Preference pairs generated for the arithmetic task (before the train / eval split)."""
    verbose_chosen_prob: float = 0.75
    """Probability that a chosen (correct) answer is wrapped in filler; rejected answers get filler
    with probability 1 - this. The gap is the verbosity confound DPO can exploit."""
    num_heldout_prompts: int = 64
    """Held-out arithmetic prompts (never in the SFT corpus or the pairs) for the verifier."""
    vocab_size: int = 512
    """Target size of the byte-level BPE tokenizer trained on the task's corpus."""
    hidden_size: int = 128
    """Width of the tiny Llama model."""
    num_layers: int = 4
    """Decoder layers of the tiny Llama model."""
    num_heads: int = 4
    """Attention heads; head_dim = hidden_size / num_heads must be >= 32 (vLLM CPU)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 256
    """MLP width of the tiny Llama model."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + completion tokens) the tiny model is built for."""
    sft_epochs: int = 5
    """Epochs of supervised fine-tuning over the SFT corpus."""
    sft_lr: float = 2e-3
    """Peak learning rate of the SFT run (AdamW, warmup then cosine decay)."""
    sft_warmup_ratio: float = 0.05
    """Fraction of SFT steps of linear warmup."""
    sft_weight_decay: float = 0.1
    """AdamW weight decay on the SFT model's matrices (it helps the arithmetic generalise)."""
    sft_batch_size: int = 16
    """Sequences per SFT step."""

    def __post_init__(self) -> None:
        check(self.num_entities >= 4, "task.num_entities", "must be >= 4")
        check(self.max_operand >= 4, "task.max_operand", "must be >= 4")
        num_problems = self.max_operand ** 2 + self.max_operand * (self.max_operand + 1) // 2
        check(2 * self.num_heldout_prompts <= num_problems, "task.num_heldout_prompts",
              f"must be at most half of the {num_problems} problems task.max_operand={self.max_operand} allows")
        for key in ("verbose_chosen_prob", "sft_filler_prob"):
            check(0.0 <= getattr(self, key) <= 1.0, f"task.{key}", "must be in [0, 1]")
        check(0.0 <= self.sft_warmup_ratio < 1.0, "task.sft_warmup_ratio", "must be in [0, 1)")
        check(self.num_heads > 0 and self.hidden_size % self.num_heads == 0, "task.num_heads",
              f"must divide task.hidden_size={self.hidden_size}")
        check(self.hidden_size // max(self.num_heads, 1) >= 32, "task.num_heads",
              "head_dim = hidden_size / num_heads must be >= 32 (vLLM's CPU attention)")
        check(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, "task.num_kv_heads",
              f"must divide task.num_heads={self.num_heads}")
        for key in ("num_sft_examples", "fact_repeats", "num_pairs", "num_heldout_prompts", "vocab_size",
                    "num_layers", "intermediate_size", "max_position_embeddings", "sft_epochs", "sft_batch_size"):
            check(getattr(self, key) > 0, f"task.{key}", "must be > 0")
        check(self.sft_lr > 0, "task.sft_lr", "must be > 0")
        check(self.sft_weight_decay >= 0, "task.sft_weight_decay", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Preference data: where it is, its schema, tokenisation and truncation."""

    train_files: tuple[str, ...] = ()
    """Input files, folders or globs (local paths or URIs). Empty: the built-in task's pairs."""
    schema: Literal["auto", "prompt_chosen_rejected", "messages", "hh_rlhf"] = "auto"
    """Input row schema; `auto` detects it from the columns."""
    prompt_column: str = "prompt"
    """Column holding the prompt (schema prompt_chosen_rejected)."""
    chosen_column: str = "chosen"
    """Column holding the preferred response."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred response."""
    max_prompt_tokens: int = 96
    """Prompt tokens kept (after the chat template)."""
    max_completion_tokens: int = 64
    """Completion tokens kept, per response."""
    truncation: Literal["keep_end_of_prompt", "reject"] = "keep_end_of_prompt"
    """Too-long pairs: cut the prompt's start and the completions' end, or reject the pair."""
    eval_fraction: float = 0.1
    """Fraction of pairs (by pair_id hash, so deterministic) held out for evaluation."""
    max_row_bytes: int = 1 << 20
    """Raw rows longer than this (bytes) are rejected as row_too_large before parsing or tokenising,
    so one gigantic line cannot exhaust memory; far above any pair the token limits keep."""
    dedup_bucket_bytes: int = 8 << 20
    """Input bytes per deduplication bucket. Kept rows are written in ceil(input bytes / this) buckets by
    pair_id hash, and one task deduplicates one bucket holding only its rows: the memory of a task is set
    by this, not by the input's size. Changes the file layout only, never the prepared rows."""

    def __post_init__(self) -> None:
        check(self.max_row_bytes > 0, "data.max_row_bytes", "must be > 0")
        check(self.dedup_bucket_bytes > 0, "data.dedup_bucket_bytes", "must be > 0")
        check(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
        check(self.max_completion_tokens > 0, "data.max_completion_tokens", "must be > 0")
        check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """The reference (SFT) model the policy starts from."""

    path: str = ""
    """HF model folder (safetensors). Empty (and no hub_id): the built-in task's tiny model."""
    hub_id: str = ""
    """Hugging Face hub id of the reference model (e.g. an SFT checkpoint). Downloaded once into
    <artifacts_dir>/hub/ (safetensors, config, tokenizer and template files only: no pickle, no code)."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of hub_id; pin a commit for reproducible runs."""
    tokenizer_path: str = ""
    """Tokenizer folder; empty means the model folder."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the frozen weights."""
    trust_remote_code: bool = False
    """Run a model folder's own Python code. Off unless turned on explicitly."""
    allow_pickle_weights: bool = False
    """Accept pickle-based weight files (*.bin, *.pt). Off: safetensors only."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """transformers' attention kernel. auto: eager for bf16 compute on the CPU (faster there than the CPU
    flash-attention kernel), transformers' default (SDPA) otherwise."""
    implementation: Literal["auto", "native", "transformers"] = "auto"
    """The model code the training workers run. native: `ropo_ray.train.llama`, a Llama in plain torch that
    computes what transformers' LlamaForCausalLM does (same names, operations and dtypes), so a worker never
    imports transformers' model code (the product's worker peaked 52 MiB lower, BENCHMARKS.md session 21:
    torch's optimizers still import torch._dynamo and sympy); an error for a model it does not cover. auto:
    native where it covers the model (Llama with SiLU, default RoPE, eager or SDPA attention), transformers
    otherwise. Scoring and evaluation processes, every export, GPU workers, the peft baselines and runs with
    train.probe_prompts (the probe samples with transformers' generate) use transformers."""


    def __post_init__(self) -> None:
        check(not (self.path and self.hub_id), "model.path", "give model.path or model.hub_id, not both")
        check(not self.hub_id or self.hub_id.count("/") == 1, "model.hub_id",
              f"expected 'organisation/name', got {self.hub_id!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The shared reference-logprob cache and the Ray Data actor pool that fills it."""

    root: str = "artifacts/refcache"
    """Folder of the cache (shared storage on a cluster); entries live under root/<key>/."""
    num_actors: int = 1
    """Actors in the pool, each holding one copy of the reference model."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (its torch threads)."""
    batch_rows: int = 256
    """Rows handed to an actor at once (consecutive in length order)."""
    token_budget: int = 8192
    """Tokens per reference forward, padding included: batch rows x the widest row (a pair is one row
    [prompt | chosen | rejected] with train.shared_prompt, else two)."""
    sort_window_rows: int = 65536
    """Pairs sorted by length together before scoring (the pool gets them in that order, so batches pad
    little)."""
    read_ahead_windows: int = 1
    """Windows read beyond one per actor. Between being read and being written, the stage holds at most
    (num_actors + read_ahead_windows) windows plus one batch of pairs, whatever the dataset's size."""

    def __post_init__(self) -> None:
        check(self.num_actors >= 1, "cache.num_actors", "must be >= 1")
        check(self.cpus_per_actor > 0, "cache.cpus_per_actor", "must be > 0")
        check(self.batch_rows >= 1, "cache.batch_rows", "must be >= 1")
        check(self.token_budget >= 1, "cache.token_budget", "must be >= 1")
        check(self.sort_window_rows >= 1, "cache.sort_window_rows", "must be >= 1")
        check(self.read_ahead_windows >= 0, "cache.read_ahead_windows", "must be >= 0")
