"""Typed configuration: one frozen dataclass per area, the single source of defaults.

YAML files hold overrides only; `ropo_ray.config.load` merges them and dotted CLI overrides
(`train.lr=1e-4`) into these classes. Each field's docstring is the string literal below it.
Validation lives in `__post_init__`, so a bad value fails when the config is built, before any
expensive work starts, with a message naming the field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


AdapterType = Literal["ropo", "lora", "oft", "boft", "full"]
ADAPTER_TYPES = typing.get_args(AdapterType)
LossType = Literal["dpo", "ipo", "rpo", "spo", "simpo", "sft"]
LOSS_TYPES = typing.get_args(LossType)


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
        _check(self.num_entities >= 4, "task.num_entities", "must be >= 4")
        _check(self.max_operand >= 4, "task.max_operand", "must be >= 4")
        num_problems = self.max_operand ** 2 + self.max_operand * (self.max_operand + 1) // 2
        _check(2 * self.num_heldout_prompts <= num_problems, "task.num_heldout_prompts",
               f"must be at most half of the {num_problems} problems task.max_operand={self.max_operand} allows")
        for key in ("verbose_chosen_prob", "sft_filler_prob"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"task.{key}", "must be in [0, 1]")
        _check(0.0 <= self.sft_warmup_ratio < 1.0, "task.sft_warmup_ratio", "must be in [0, 1)")
        _check(self.num_heads > 0 and self.hidden_size % self.num_heads == 0, "task.num_heads",
               f"must divide task.hidden_size={self.hidden_size}")
        _check(self.hidden_size // max(self.num_heads, 1) >= 32, "task.num_heads",
               "head_dim = hidden_size / num_heads must be >= 32 (vLLM's CPU attention)")
        _check(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, "task.num_kv_heads",
               f"must divide task.num_heads={self.num_heads}")
        for key in ("num_sft_examples", "fact_repeats", "num_pairs", "num_heldout_prompts", "vocab_size",
                    "num_layers", "intermediate_size", "max_position_embeddings", "sft_epochs", "sft_batch_size"):
            _check(getattr(self, key) > 0, f"task.{key}", "must be > 0")
        _check(self.sft_lr > 0, "task.sft_lr", "must be > 0")
        _check(self.sft_weight_decay >= 0, "task.sft_weight_decay", "must be >= 0")


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

    def __post_init__(self) -> None:
        _check(self.max_row_bytes > 0, "data.max_row_bytes", "must be > 0")
        _check(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
        _check(self.max_completion_tokens > 0, "data.max_completion_tokens", "must be > 0")
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")


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


    def __post_init__(self) -> None:
        _check(not (self.path and self.hub_id), "model.path", "give model.path or model.hub_id, not both")
        _check(not self.hub_id or self.hub_id.count("/") == 1, "model.hub_id",
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
    """Tokens per reference forward: rows x longest pair in the micro-batch."""

    def __post_init__(self) -> None:
        _check(self.num_actors >= 1, "cache.num_actors", "must be >= 1")
        _check(self.cpus_per_actor > 0, "cache.cpus_per_actor", "must be > 0")
        _check(self.batch_rows >= 1, "cache.batch_rows", "must be >= 1")
        _check(self.token_budget >= 1, "cache.token_budget", "must be >= 1")


@dataclass(frozen=True)
class AdapterConfig:
    """What trains: RoPO rotations + magnitudes (default), or a baseline behind the same interface."""

    type: AdapterType = "ropo"
    """Adapter kind. `full` trains every weight (full-weight DPO)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers adapted, matched as regular expressions against the end of module names."""
    block_sizes: tuple[int, ...] = (2, 4, 8)
    """RoPO rotation block sizes, one Cayley block-diagonal factor each (ROPO_SPEC section 2)."""
    mixing: Literal["shift", "stride", "none"] = "shift"
    """Permutation conjugating each factor after the first, so fine and coarse blocks straddle each
    other. `none` keeps blocks aligned (nested sizes then mix no more than the largest block)."""
    cayley: Literal["exact", "neumann"] = "exact"
    """Cayley transform: exact batched solve, or a truncated Neumann series of (I + S)^-1."""
    neumann_terms: int = 5
    """Terms of the Neumann series when cayley = neumann."""
    learn_magnitude: bool = True
    """Train the per-neuron magnitude m (RoPO). Off: rotation only (OFT-like)."""
    kernel: Literal["auto", "native", "torch"] = "auto"
    """How the rotation is applied to CPU activations. `native`: the band kernel (kernels/band_chain.c,
    built on first use with the C compiler; needs mixing shift or none); `torch`: batched block matmuls
    (also what CUDA tensors always use); `auto`: native when it builds and the mixing is banded, else torch.
    Both compute the same function (to float rounding)."""
    lora_r: int = 8
    """LoRA rank (adapter type lora)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (adapter type lora)."""
    lora_dropout: float = 0.0
    """LoRA dropout (adapter type lora)."""
    oft_block_size: int = 8
    """Block size of peft's OFT / BOFT baselines."""
    boft_butterfly_factor: int = 1
    """BOFT butterfly factors (1 is single-factor BOFT)."""

    def __post_init__(self) -> None:
        _check(len(self.target_modules) > 0, "adapter.target_modules", "must name at least one module")
        _check(len(self.block_sizes) > 0, "adapter.block_sizes", "must hold at least one block size")
        for b in self.block_sizes:
            _check(isinstance(b, int) and b >= 2, "adapter.block_sizes", f"block size {b!r} must be an int >= 2")
        _check(self.neumann_terms >= 1, "adapter.neumann_terms", "must be >= 1")
        _check(self.lora_r >= 1, "adapter.lora_r", "must be >= 1")
        _check(self.oft_block_size >= 2, "adapter.oft_block_size", "must be >= 2")
        _check(self.boft_butterfly_factor >= 1, "adapter.boft_butterfly_factor", "must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, "adapter.lora_dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class LossConfig:
    """The preference loss (ROPO_SPEC section 3), picked by name from the registry."""

    type: LossType = "dpo"
    """Loss name. RoPO is the DPO loss on the rotated policy."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward."""
    label_smoothing: float = 0.0
    """Conservative-DPO label smoothing eps in [0, 0.5)."""
    rpo_alpha: float = 0.005
    """RPO: weight of the chosen-response NLL term."""
    rpo_nll: Literal["sum", "mean"] = "sum"
    """RPO: NLL summed over tokens and scaled by beta (official code), or token-averaged."""
    spo_lambda: float = 1.0
    """SPO (reconstruction): weight of the penalty keeping logp(chosen) above the reference's."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""

    def __post_init__(self) -> None:
        _check(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        _check(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
        _check(self.rpo_alpha >= 0, "loss.rpo_alpha", "must be >= 0")
        _check(self.spo_lambda >= 0, "loss.spo_lambda", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the trainable parameters."""

    lr: float = 3e-3
    """Peak learning rate (AdamW). Rotation and magnitude parameters take far larger rates than full
    fine-tuning (on the built-in task 1e-3..3e-3 learn steadily, 1e-2 oscillates)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 2
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    micro_batch_size: int = 16
    """Pairs per forward on one worker."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warmup before cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    log_every: int = 5
    """Report training metrics every N optimizer steps."""
    eval_every: int = 20
    """Evaluate on the held-out pairs every N optimizer steps (and at the end)."""
    seed: int = 0
    """Seed of data order and adapter init."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks, one DeepSpeed engine each)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; its torch threads follow it."""
    use_gpu: bool = False
    """One GPU per worker (GPU clusters); off here."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto is nccl with GPUs, gloo without."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states in CPU memory (stages 1-3)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (bf16 keeps fp32 master weights)."""
    probe_prompts: int = 0
    """Held-out prompts the policy and the reference answer at each evaluation, for the KL and
    answer-length probe (train/probe.py); 0 turns it off. Needs an adapter on a frozen base."""
    probe_max_tokens: int = 32
    """Tokens sampled per probe answer at most."""
    peak_flops: float = 0.0
    """One worker's peak FLOP/s for the reported MFU (e.g. 312e12 for an A100 in bf16); 0 measures a
    matmul at worker start-up in the training precision with the worker's threads."""
    deepspeed_config: str = ""
    """A DeepSpeed JSON file honoured as given; "auto" values in it are filled from these settings."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (works with only the adapters trainable)."""
    checkpoint_every: int = 50
    """Save a Ray Train checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the newest)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint after a lost worker."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.peak_flops >= 0, "train.peak_flops", "must be >= 0 (0 measures it)")
        _check(self.probe_prompts >= 0, "train.probe_prompts", "must be >= 0 (0 turns the probe off)")
        _check(self.probe_max_tokens >= 1, "train.probe_max_tokens", "must be >= 1")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over beta, block sizes and learning rate (and optionally loss, adapter, targets)."""

    enabled: bool = False
    """Run a sweep before the final training (the pipeline then trains the best configuration)."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random: sample the space; grid: every combination of the *_values lists and choices; optuna:
    Optuna's TPE sampler over the same space (needs the `optuna` package)."""
    num_samples: int = 4
    """Trials drawn (random, optuna), or repeats of the whole grid (grid). A configuration that comes
    up again trains the same run (same seed), so it is reported from its first run, not retrained."""
    beta_range: tuple[float, float] = (0.05, 0.5)
    """Log-uniform range of loss.beta (used when beta_values is empty)."""
    beta_values: tuple[float, ...] = ()
    """Explicit values of loss.beta; required for a grid over beta."""
    lr_range: tuple[float, float] = (3e-3, 3e-2)
    """Log-uniform range of train.lr (used when lr_values is empty)."""
    lr_values: tuple[float, ...] = ()
    """Explicit values of train.lr; required for a grid over the learning rate."""
    block_size_choices: tuple[tuple[int, ...], ...] = ((2,), (4,), (2, 4), (2, 4, 8))
    """Choices of adapter.block_sizes."""
    loss_types: tuple[str, ...] = ()
    """Choices of loss.type (e.g. dpo, ipo, simpo); empty keeps loss.type."""
    adapter_types: tuple[str, ...] = ()
    """Choices of adapter.type (e.g. ropo, lora, oft), so one sweep compares RoPO with its baselines."""
    target_module_choices: tuple[tuple[str, ...], ...] = ()
    """Choices of adapter.target_modules; empty keeps adapter.target_modules."""
    objective: Literal["eval/loss", "eval/rewards/accuracies"] = "eval/loss"
    """Held-out metric the sweep optimises (loss is minimised, accuracy maximised), penalised as below."""
    kl_penalty: float = 0.0
    """Weight of the probe's KL(policy || reference) in the objective, so a sweep cannot pick a policy
    that wins by drifting far from the reference (needs train.probe_prompts > 0)."""
    length_penalty: float = 0.0
    """Weight of answer-length growth, max(0, policy length / reference length - 1), in the objective
    (needs train.probe_prompts > 0)."""
    scheduler: Literal["asha", "none"] = "asha"
    """ASHA early stopping on the objective, or run every trial to the end."""
    grace_period: int = 0
    """Steps a trial runs before ASHA may stop it; 0 means train.eval_every."""
    reduction_factor: int = 2
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 derives it from the cluster's CPUs (GPUs) and one trial's workers."""
    seed: int = 0
    """Seed of the search algorithm (the same seed draws the same trials)."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        for key in ("beta_range", "lr_range"):
            lo, hi = getattr(self, key)
            _check(0 < lo <= hi, f"tune.{key}", f"must satisfy 0 < low <= high, got {(lo, hi)}")
        for key in ("beta_values", "lr_values"):
            _check(all(v > 0 for v in getattr(self, key)), f"tune.{key}", "every value must be > 0")
        _check(len(self.block_size_choices) > 0, "tune.block_size_choices", "needs at least one choice")
        for choice in self.block_size_choices:
            _check(len(choice) > 0 and all(b >= 2 for b in choice), "tune.block_size_choices",
                   f"every choice needs block sizes >= 2, got {choice}")
        for loss in self.loss_types:
            _check(loss in LOSS_TYPES, "tune.loss_types", f"unknown loss {loss!r}; known: {list(LOSS_TYPES)}")
        for adapter in self.adapter_types:
            _check(adapter in ADAPTER_TYPES, "tune.adapter_types",
                   f"unknown adapter {adapter!r}; known: {list(ADAPTER_TYPES)}")
        for choice in self.target_module_choices:
            _check(len(choice) > 0, "tune.target_module_choices", "every choice needs at least one module pattern")
        _check(self.kl_penalty >= 0 and self.length_penalty >= 0, "tune.kl_penalty",
               "penalty weights must be >= 0")
        _check(self.grace_period >= 0, "tune.grace_period", "must be >= 0")
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        _check(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0 (0 derives it)")
        if self.search == "grid":
            _check(bool(self.beta_values) and bool(self.lr_values), "tune.search",
                   "a grid needs explicit tune.beta_values and tune.lr_values")


@dataclass(frozen=True)
class EvalConfig:
    """Sampling and diagnostics of trained policies against the reference (`ropo-ray evaluate`)."""

    runs: tuple[str, ...] = ()
    """Exported runs to evaluate (folders holding merged/, config.yaml); empty: <run_dir>/model."""
    samples_per_prompt: int = 4
    """Samples drawn per held-out prompt."""
    num_prompts: int = 0
    """Held-out prompts sampled (the first N); 0: all of them."""
    temperature: float = 1.0
    """Sampling temperature (1.0 draws from the model itself, which the KL estimate assumes)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 48
    """Tokens generated per sample at most."""
    probe_max_tokens: int = 24
    """Tokens generated per knowledge-probe answer (greedy decoding)."""
    seed: int = 0
    """Base of the per-request seeds (each request gets its own, derived from prompt and sample index)."""
    prompts_file: str = ""
    """JSONL of held-out prompts {"prompt": str, "answer": int (optional, for the verifier)};
    empty: the built-in task's held-out problems."""
    probes_file: str = ""
    """JSONL of knowledge probes {"prompt", "answer", "response"}; empty: the built-in task's probes."""
    reward_model: str = ""
    """Optional HF sequence-classification folder scoring (prompt, response); wins are then judged by it."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """vLLM engine dtype."""
    use_gpu: bool = False
    """Give each vLLM engine GPUs (tensor_parallel_size of them) instead of CPUs."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine (GPU clusters)."""
    num_engines: int = 1
    """vLLM engines sampling in parallel (Ray Data actors)."""
    cpus_per_engine: int = 1
    """CPUs reserved by each vLLM engine on CPU machines."""
    kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE of each CPU engine, GiB."""
    max_model_len: int = 256
    """Longest prompt + answer the engine accepts, tokens."""
    batch_size: int = 64
    """Requests per Ray Data batch sent to an engine."""
    score_batch_size: int = 32
    """Sequences per forward when scoring log-probs."""
    examples: int = 4
    """Example responses shown per run in the report."""
    report_dir: str = ""
    """Where report.json / report.html go; empty: <run_dir>/report."""

    def __post_init__(self) -> None:
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.num_prompts >= 0, "eval.num_prompts", "must be >= 0")
        _check(self.temperature >= 0, "eval.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _check(self.max_tokens >= 1, "eval.max_tokens", "must be >= 1")
        _check(self.probe_max_tokens >= 1, "eval.probe_max_tokens", "must be >= 1")
        for name in ("tensor_parallel_size", "num_engines", "cpus_per_engine", "kv_cache_gib", "batch_size",
                     "score_batch_size"):
            _check(getattr(self, name) >= 1, f"eval.{name}", "must be >= 1")
        _check(self.max_model_len >= 8, "eval.max_model_len", "must be >= 8")
        _check(self.examples >= 0, "eval.examples", "must be >= 0")


@dataclass(frozen=True)
class PipelineConfig:
    """Where a run lives and which stages it runs."""

    run_dir: str = "runs/demo"
    """Folder of this run's outputs (data, checkpoints, report). Local path or URI."""
    artifacts_dir: str = "artifacts"
    """Folder of reusable artifacts (the built-in task's model) shared between runs."""
    compare_runs: tuple[str, ...] = ()
    """Baselines trained from the same reference and cache and compared in the report: each entry is a
    space-separated list of dotted overrides on top of this config, e.g. "adapter.type=full train.lr=1e-4"."""

    def __post_init__(self) -> None:
        for spec in self.compare_runs:
            _check(bool(spec.split()) and all("=" in item for item in spec.split()), "pipeline.compare_runs",
                   f"each entry is 'section.key=value ...', got {spec!r}")


@dataclass(frozen=True)
class Config:
    """The whole configuration of a ropo-ray run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if self.tune.kl_penalty or self.tune.length_penalty:
            _check(self.train.probe_prompts > 0, "train.probe_prompts",
                   "tune.kl_penalty / tune.length_penalty need the probe: set train.probe_prompts > 0")
        if self.train.probe_prompts:
            _check("full" not in {self.adapter.type, *self.tune.adapter_types}, "train.probe_prompts",
                   "the probe's reference is the frozen base under the adapters; adapter.type=full has none")
