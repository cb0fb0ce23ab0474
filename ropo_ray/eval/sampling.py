"""Sampling a model folder with vLLM through Ray Data (`ray.data.llm`), one request per sample.

Every request carries its own seed, derived from (eval seed, prompt index, sample index): a single seed
on every request makes all prompts' samples identical draws (STACK.md pitfall 4), and an engine-level
seed with n > 1 would tie a sample to its position in the engine's batch. The derived seed also makes
policy and reference draw with the same random numbers per (prompt, sample): common random numbers,
which lower the variance of their paired comparisons.

Prompts arrive already tokenised by `ropo_ray.data.tokenize.encode_prompt` (the one construction of a
sequence used in training), so the engine's own tokenizer and chat-template stages are off. On CPU the
engine's placement group asks for CPUs only (by default it asks for a GPU and waits forever) and its
metrics export is off (it needs `ray[serve]`): STACK.md item 9. CPU engines run the model eagerly
(`eval.enforce_eager`: vLLM's torch.compile only lengthens their start here). On GPU clusters the same
processor takes GPU bundles from `eval.use_gpu` / `eval.tensor_parallel_size` and compiles the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ropo_ray.config.schema import EvalConfig


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 31-bit seed per (prompt, sample), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_requests(prompts: Sequence[Sequence[int]], cfg: EvalConfig, kind: str, samples: int,
                    greedy: bool = False) -> list[dict[str, Any]]:
    """Rows of the sampling dataset: `samples` requests per prompt, each with its own seed."""
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(samples):
            rows.append({"kind": kind, "prompt_index": i, "sample_index": j, "tokenized_prompt": list(prompt),
                         "seed": request_seed(cfg.seed, i, j), "greedy": greedy})
    return rows


def _sampling_params(row: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """Every key on every row: Ray Data unifies a column's struct type, so a key missing from some rows
    would reach vLLM as None."""
    if row["greedy"]:
        return {"temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.probe_max_tokens, "seed": int(row["seed"])}
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
            "seed": int(row["seed"])}


def engine_settings(cfg: EvalConfig, model_dir: str) -> dict[str, Any]:
    """vLLMEngineProcessorConfig keyword arguments for this machine (CPU) or a GPU cluster."""
    tp = cfg.tensor_parallel_size
    bundle = {"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": cfg.cpus_per_engine}
    settings: dict[str, Any] = {
        "model_source": model_dir,
        "engine_kwargs": {"dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "tensor_parallel_size": tp,
                          "seed": cfg.seed, "enable_prefix_caching": True,
                          "enforce_eager": (not cfg.use_gpu) if cfg.enforce_eager is None else cfg.enforce_eager},
        "batch_size": cfg.batch_size,
        "concurrency": cfg.num_engines,
        "placement_group_config": {"bundles": [bundle] * (tp if cfg.use_gpu else 1)},
        "log_engine_metrics": False,
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
    }
    if not cfg.use_gpu:
        settings["runtime_env"] = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
                                                "OMP_NUM_THREADS": str(cfg.cpus_per_engine)}}
    return settings


def generate(model_dir: str, rows: list[dict[str, Any]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """Run `rows` through one vLLM engine (pool) on `model_dir`; return the rows with `tokens`
    (generated ids, EOS included when the model stopped) and `text`, in input order."""
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "sampling_params": _sampling_params(row, cfg)}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        keep = ("kind", "prompt_index", "sample_index", "seed", "greedy")
        return {**{k: row[k] for k in keep}, "tokens": [int(t) for t in row["generated_tokens"]],
                "text": row["generated_text"]}

    processor = build_processor(vLLMEngineProcessorConfig(**engine_settings(cfg, model_dir)),
                                preprocess=preprocess, postprocess=postprocess)
    out = processor(ray.data.from_items(rows)).take_all()
    out.sort(key=lambda r: (r["kind"], r["prompt_index"], r["sample_index"]))
    return out
