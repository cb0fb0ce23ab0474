"""Typed configuration: one frozen dataclass per area, the single source of defaults.

YAML files hold overrides only; `ropo_ray.config.load` merges them and dotted CLI overrides
(`train.lr=1e-4`) into these classes. Each field's docstring is the string literal below it.
Validation lives in `__post_init__`, so a bad value fails when the config is built, before any
expensive work starts, with a message naming the field.

The areas live in `inputs.py` (task, data, model, cache) and `training.py` (adapter, loss, train, tune);
evaluation, the pipeline and the whole `Config` are here, and every class is importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ropo_ray.config.checks import ConfigError, check
from ropo_ray.config.inputs import CacheConfig, DataConfig, ModelConfig, TaskConfig
from ropo_ray.config.training import (
    ADAPTER_TYPES,
    LOSS_TYPES,
    AdapterConfig,
    AdapterType,
    LossConfig,
    LossType,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "ADAPTER_TYPES", "LOSS_TYPES", "AdapterConfig", "AdapterType", "CacheConfig", "Config", "ConfigError", "DataConfig",
    "EvalConfig", "LossConfig", "LossType", "ModelConfig", "PipelineConfig", "TaskConfig", "TrainConfig", "TuneConfig",
]


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
    """vLLM engines sampling in parallel (one Ray actor each); the requests are split evenly between them."""
    share_engines: bool = True
    """Start the engines once per evaluation and load each further model (the runs share the reference's
    architecture) by reloading the weights in place; false: fresh engines for every model. On 2 CPUs an
    engine start takes about 10 s, a reload of the demo model under a second (benchmarks/BENCHMARKS.md,
    "One engine for the whole evaluation")."""
    cpus_per_engine: int = 1
    """CPUs reserved by each vLLM engine on CPU machines."""
    enforce_eager: bool | None = None
    """vLLM's enforce_eager: True runs the model eagerly, False lets vLLM compile it (torch.compile; CUDA
    graphs on GPU). None: eager on CPU engines, compiled on GPU ones. On a 2-core CPU compiling lengthens the
    engine's start from about 10 s to 20 s (38 s the first time a model's graphs are compiled; once per
    evaluation with shared engines) and then samples a 48.7M-parameter model 1.2x to 1.5x as fast (fp32
    1.47x and 1.16x, bf16 1.18x and 1.52x, single runs in two calibrations): set false on CPU when an
    evaluation's sampling takes minutes; the demo's takes seconds. Compiled kernels may round differently,
    so samples can differ from eager ones (benchmarks/BENCHMARKS.md, session 24)."""
    kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE of each CPU engine, GiB."""
    max_model_len: int = 256
    """Longest prompt + answer the engine accepts, tokens."""
    batch_size: int = 1024
    """Requests handed to an engine per call; the engine keeps up to vLLM's max_num_seqs of them in flight,
    so small calls leave it stepping over few sequences at each call's end."""
    score_batch_size: int = 32
    """Sequences per forward when scoring log-probs."""
    examples: int = 4
    """Example responses shown per run in the report."""
    report_dir: str = ""
    """Where report.json / report.html go; empty: <run_dir>/report."""

    def __post_init__(self) -> None:
        check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        check(self.num_prompts >= 0, "eval.num_prompts", "must be >= 0")
        check(self.temperature >= 0, "eval.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        check(self.max_tokens >= 1, "eval.max_tokens", "must be >= 1")
        check(self.probe_max_tokens >= 1, "eval.probe_max_tokens", "must be >= 1")
        for name in ("tensor_parallel_size", "num_engines", "cpus_per_engine", "kv_cache_gib", "batch_size",
                     "score_batch_size"):
            check(getattr(self, name) >= 1, f"eval.{name}", "must be >= 1")
        check(self.max_model_len >= 8, "eval.max_model_len", "must be >= 8")
        check(self.examples >= 0, "eval.examples", "must be >= 0")


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
            check(bool(spec.split()) and all("=" in item for item in spec.split()), "pipeline.compare_runs",
                  f"each entry is 'section.key=value ...', got {spec!r}")


def native_model_runs(adapter_types: set[str], train: TrainConfig) -> bool:
    """Whether training with these adapters and settings can run `ropo_ray.train.llama`'s model
    (`model.implementation`): plain nn.Linear adapters (ropo, full), CPU workers, no probe (it samples with
    transformers' generate)."""
    return adapter_types <= {"ropo", "full"} and not train.use_gpu and not train.probe_prompts


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
        check(not self.train.shared_prompt or self.model.attn_implementation in ("auto", "eager", "sdpa"),
              "train.shared_prompt", "needs attention that applies a 4D additive mask (eager or sdpa); "
              f"model.attn_implementation={self.model.attn_implementation} does not: set train.shared_prompt=false")
        if self.tune.kl_penalty or self.tune.length_penalty:
            check(self.train.probe_prompts > 0, "train.probe_prompts",
                  "tune.kl_penalty / tune.length_penalty need the probe: set train.probe_prompts > 0")
        if self.model.implementation == "native":
            check(native_model_runs({self.adapter.type, *self.tune.adapter_types}, self.train), "model.implementation",
                  "native runs CPU training workers with the ropo or full adapter and no probe (train.probe_prompts "
                  "samples with transformers' generate): set model.implementation=auto")
        if self.train.probe_prompts:
            check("full" not in {self.adapter.type, *self.tune.adapter_types}, "train.probe_prompts",
                  "the probe's reference is the frozen base under the adapters; adapter.type=full has none")
