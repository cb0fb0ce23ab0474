"""Configuration of what a run trains and sweeps: the adapter, the loss, the trainer and the Tune sweep (see
schema.py for the conventions)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Literal

from ropo_ray.config.checks import check

JEMALLOC_OPTION = re.compile(r"[a-z_]+:[^,:\s]+")

AdapterType = Literal["ropo", "lora", "oft", "boft", "full"]
ADAPTER_TYPES = typing.get_args(AdapterType)
LossType = Literal["dpo", "ipo", "rpo", "spo", "simpo", "sft"]
LOSS_TYPES = typing.get_args(LossType)


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
        check(len(self.target_modules) > 0, "adapter.target_modules", "must name at least one module")
        check(len(self.block_sizes) > 0, "adapter.block_sizes", "must hold at least one block size")
        for b in self.block_sizes:
            check(isinstance(b, int) and b >= 2, "adapter.block_sizes", f"block size {b!r} must be an int >= 2")
        check(self.neumann_terms >= 1, "adapter.neumann_terms", "must be >= 1")
        check(self.lora_r >= 1, "adapter.lora_r", "must be >= 1")
        check(self.oft_block_size >= 2, "adapter.oft_block_size", "must be >= 2")
        check(self.boft_butterfly_factor >= 1, "adapter.boft_butterfly_factor", "must be >= 1")
        check(0.0 <= self.lora_dropout < 1.0, "adapter.lora_dropout", "must be in [0, 1)")


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
        check(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
        check(self.rpo_alpha >= 0, "loss.rpo_alpha", "must be >= 0")
        check(self.spo_lambda >= 0, "loss.spo_lambda", "must be >= 0")


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
    shared_prompt: bool = True
    """Run each pair's prompt once: one row [prompt | chosen | rejected] per pair, with an attention mask that
    keeps the rejected tokens from seeing the chosen ones and positions that start both completions at the
    prompt's end (ropo_ray/train/logprobs.py; arXiv 2410.20305). The same log-probs as stacking chosen and
    rejected sequences (false), in fewer tokens: 89 instead of 150 per pair on issue 8's benchmark pairs.
    Needs attention that applies a 4D additive mask: model.attn_implementation auto, eager or sdpa."""
    pad_to_multiple: int = 8
    """Pad each batch's width (tokens per row) up to a multiple of this (1: to the longest row only), so that
    batches come in few shapes: oneDNN builds and keeps kernels for every shape it meets. On a Zen 4 the
    product's bf16 worker ran 6.30 pairs/s at 8 against 5.70 at 1 (ahead in each of three repeats) and peaked
    at 797 MiB against 823 (BENCHMARKS.md, session 18); 16 cost 10% of the speed for no more saving."""
    checkpoint_every: int = 50
    """Save a Ray Train checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the newest)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint after a lost worker."""
    allocator: Literal["system", "jemalloc"] = "jemalloc"
    """Memory allocator of the training workers: system (glibc's malloc) or jemalloc, preloaded into the
    worker processes (ropo_ray.train.allocator); jemalloc needs libjemalloc.so.2 on every node."""
    jemalloc_conf: str = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    """jemalloc's options for the workers (its MALLOC_CONF syntax; empty: jemalloc's defaults). The default
    keeps freed pages for reuse instead of returning them after jemalloc's 10 s decay: a step reuses the
    previous step's pages, where decay made it fault fresh ones. RoPO steps ran 6-15% faster than with the
    decay, for at most 43 MiB more peak (BENCHMARKS.md, session 13; results/train_jemalloc_decay.json)."""
    worker_niceness: int = 0
    """Scheduling niceness of the Ray Train worker processes (0-19; passed as RAY_worker_niceness in their
    runtime env, as Ray's job supervisor does for itself). Ray starts worker processes at 15 so that its own
    processes keep the CPU under load; a training worker then yields to every Ray process that wakes. On a
    2-core machine the product's bf16 worker ran at 9.54 pairs/s at 0 against 9.42 at 15 (medians of three
    repeats, 0 ahead by 1.3-2.9% in each; BENCHMARKS.md, session 17). 15 gives Ray's default back."""
    lean_imports: bool = True
    """Keep out of the workers what they import but never call (ropo_ray/train/lean.py): Triton, the GPU
    kernel compiler torch._dynamo loads, on CPU workers (71 MiB of a worker's peak), and DeepSpeed's Muon
    optimizer module, imported only to be told the optimizer is not Muon (43 MiB); false imports both."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
        check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        check(self.epochs >= 1, "train.epochs", "must be >= 1")
        check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        check(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        check(self.pad_to_multiple >= 1, "train.pad_to_multiple", "must be >= 1")
        check(self.peak_flops >= 0, "train.peak_flops", "must be >= 0 (0 measures it)")
        check(self.probe_prompts >= 0, "train.probe_prompts", "must be >= 0 (0 turns the probe off)")
        check(self.probe_max_tokens >= 1, "train.probe_max_tokens", "must be >= 1")
        check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        check(0 <= self.worker_niceness <= 19, "train.worker_niceness",
              f"must be in 0-19 (raising a process's priority above 0 needs privileges), got {self.worker_niceness}")
        options = self.jemalloc_conf.split(",") if self.jemalloc_conf else []
        malformed = [o for o in options if not JEMALLOC_OPTION.fullmatch(o)]
        check(not malformed, "train.jemalloc_conf",
              f"expected name:value options separated by commas (jemalloc's MALLOC_CONF), got {malformed[:3]}")


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
        check(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        for key in ("beta_range", "lr_range"):
            lo, hi = getattr(self, key)
            check(0 < lo <= hi, f"tune.{key}", f"must satisfy 0 < low <= high, got {(lo, hi)}")
        for key in ("beta_values", "lr_values"):
            check(all(v > 0 for v in getattr(self, key)), f"tune.{key}", "every value must be > 0")
        check(len(self.block_size_choices) > 0, "tune.block_size_choices", "needs at least one choice")
        for choice in self.block_size_choices:
            check(len(choice) > 0 and all(b >= 2 for b in choice), "tune.block_size_choices",
                  f"every choice needs block sizes >= 2, got {choice}")
        for loss in self.loss_types:
            check(loss in LOSS_TYPES, "tune.loss_types", f"unknown loss {loss!r}; known: {list(LOSS_TYPES)}")
        for adapter in self.adapter_types:
            check(adapter in ADAPTER_TYPES, "tune.adapter_types",
                  f"unknown adapter {adapter!r}; known: {list(ADAPTER_TYPES)}")
        for choice in self.target_module_choices:
            check(len(choice) > 0, "tune.target_module_choices", "every choice needs at least one module pattern")
        check(self.kl_penalty >= 0 and self.length_penalty >= 0, "tune.kl_penalty",
              "penalty weights must be >= 0")
        check(self.grace_period >= 0, "tune.grace_period", "must be >= 0")
        check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        check(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0 (0 derives it)")
        if self.search == "grid":
            check(bool(self.beta_values) and bool(self.lr_values), "tune.search",
                  "a grid needs explicit tune.beta_values and tune.lr_values")
