"""Sampling model folders with vLLM engines held by Ray actors, one request per sample.

Every request carries its own seed, derived from (eval seed, prompt index, sample index): a single seed
on every request makes all prompts' samples identical draws (STACK.md pitfall 4), and an engine-level
seed with n > 1 would tie a sample to its position in the engine's batch. The derived seed also makes
policy and reference draw with the same random numbers per (prompt, sample): common random numbers,
which lower the variance of their paired comparisons. Because a sample depends only on its seed, how
the requests are split across engines does not change it.

An evaluation samples the reference and every run, models of one architecture (the runs are the
reference's base with trained weights merged in). `SamplingEngines` therefore starts its engines once
and, for each further model, reloads the weights into them in place (vLLM's `reload_weights`) and
empties their prefix cache, whose blocks hold the previous model's keys and values: on 2 CPUs a
start costs about 10 s (24-27 s with the engine core in a process of its own), a reload of the demo model
well under a second (BENCHMARKS.md, session 23). A model whose configuration,
generation settings or tokenizer differ from the loaded one gets fresh engines, as does every model
when `eval.share_engines` is false.

Prompts arrive already tokenised by `ropo_ray.data.tokenize.encode_prompt` (the one construction of a
sequence used in training). CPU engines run the model eagerly unless `eval.enforce_eager` is false (vLLM's
torch.compile doubles their start and pays only when sampling takes minutes), with `eval.cpus_per_engine`
OpenMP threads and the engine core inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0); on GPU
clusters each engine's actor takes `eval.tensor_parallel_size` GPUs and vLLM compiles the model. A weight
reload reaches compiled graphs too: they read the parameters, not copies of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ropo_ray.config.schema import EvalConfig

# Files of a model folder that the engine reads besides the weights; a model that differs from the loaded
# one in any of them gets fresh engines instead of a weight reload. Keys saying where a folder came from or
# how it was loaded are left out (transformers writes `is_local` and `local_files_only` into the
# tokenizer_config.json of a tokenizer it loaded from a folder and saved again); the engine's dtype is
# `eval.dtype`, whatever the checkpoint's.
ENGINE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
PROVENANCE_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
                             "is_local", "local_files_only"})
CLOSE_TIMEOUT_S = 120.0  # an engine's own shutdown; an actor still busy after it is killed


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 31-bit seed per (prompt, sample), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_requests(prompts: Sequence[Sequence[int]], cfg: EvalConfig, kind: str, samples: int,
                    greedy: bool = False) -> list[dict[str, Any]]:
    """Requests: `samples` per prompt, each with its own seed."""
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(samples):
            rows.append({"kind": kind, "prompt_index": i, "sample_index": j, "tokenized_prompt": list(prompt),
                         "seed": request_seed(cfg.seed, i, j), "greedy": greedy})
    return rows


def sampling_params(row: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments of one request."""
    if row["greedy"]:
        return {"temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.probe_max_tokens, "seed": int(row["seed"])}
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
            "seed": int(row["seed"])}


def engine_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The engine's `vllm.LLM` keyword arguments (`engine_kwargs`, the model aside) and its Ray actor's
    options (`actor_options`), for this machine (CPU) or a GPU cluster."""
    engine_kwargs = {"dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
                     "tensor_parallel_size": cfg.tensor_parallel_size, "seed": cfg.seed,
                     "enable_prefix_caching": True, "disable_log_stats": True,
                     "enforce_eager": (not cfg.use_gpu) if cfg.enforce_eager is None else cfg.enforce_eager}
    if cfg.use_gpu:
        actor_options: dict[str, Any] = {"num_cpus": 1, "num_gpus": cfg.tensor_parallel_size}
    else:
        # The engine core in the actor's own process: as a process of its own it shares the actor's CPUs with
        # the actor, which hands it requests and takes its outputs every step (BENCHMARKS.md, session 23).
        actor_options = {"num_cpus": cfg.cpus_per_engine,
                         "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
                                                      "OMP_NUM_THREADS": str(cfg.cpus_per_engine),
                                                      "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}}
    return {"engine_kwargs": engine_kwargs, "actor_options": actor_options}


def engine_key(model_dir: str | Path) -> str:
    """What an engine holds besides the weights: the folder's configuration, generation settings and
    tokenizer files (provenance keys aside). Two folders with the same key can share an engine."""
    folder, digest = Path(model_dir), hashlib.sha256()
    for name in ENGINE_FILES:
        path = folder / name
        if not path.is_file():
            digest.update(f"{name}: absent\n".encode())
            continue
        data = path.read_bytes()
        if name.endswith(".json") and name != "tokenizer.json":
            content = {k: v for k, v in json.loads(data).items() if k not in PROVENANCE_KEYS}
            data = json.dumps(content, sort_keys=True).encode()
        digest.update(f"{name}: ".encode() + hashlib.sha256(data).digest() + b"\n")
    return digest.hexdigest()


class VLLMSampler:
    """A Ray actor holding one vLLM engine, started on a model folder: `load` another folder's weights
    into it, `generate` requests on it."""

    def __init__(self, model_dir: str, engine_kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_dir, **engine_kwargs)

    def load(self, model_dir: str) -> None:
        """Put `model_dir`'s weights in place of the loaded ones; the prefix cache's blocks were computed
        with the old weights, so they go too."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"vLLM could not empty its prefix cache after loading {model_dir}")

    def generate(self, rows: list[dict[str, Any]], params: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`rows` with `tokens` (generated ids, EOS included when the model stopped) and `text`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r["tokenized_prompt"])) for r in rows]
        outputs = self.llm.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)
        keep = ("kind", "prompt_index", "sample_index", "seed", "greedy")
        return [{**{k: r[k] for k in keep}, "tokens": [int(t) for t in o.outputs[0].token_ids],
                 "text": o.outputs[0].text} for r, o in zip(rows, outputs, strict=True)]

    def close(self) -> None:
        """Stop the engine's core (its process, when it has one) before the actor goes."""
        self.llm.llm_engine.engine_core.shutdown()


class SamplingEngines:
    """`eval.num_engines` vLLM engines, started for the first model and reused, by reloading weights, for
    every later model of the same engine key (see the module's docstring). Use as a context manager."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.settings = engine_settings(cfg)
        self.actors: list[Any] = []
        self.key: str | None = None  # engine_key of the model the engines hold
        self.model_dir: str | None = None  # the folder whose weights they hold
        self.starts = 0
        self.reloads = 0

    def __enter__(self) -> SamplingEngines:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=CLOSE_TIMEOUT_S)
            except ray.exceptions.RayError:  # died already, or hangs (GetTimeoutError): killed below either way
                pass
            ray.kill(actor)
        self.actors, self.key, self.model_dir = [], None, None

    def _load(self, model_dir: str) -> None:
        import ray

        key = engine_key(model_dir)
        if self.actors and self.cfg.share_engines and key == self.key:
            if model_dir != self.model_dir:
                ray.get([a.load.remote(model_dir) for a in self.actors])
                self.reloads += 1
        else:
            self.close()
            cls = ray.remote(VLLMSampler).options(**self.settings["actor_options"])
            self.actors = [cls.remote(model_dir, self.settings["engine_kwargs"])
                           for _ in range(self.cfg.num_engines)]
            ray.get([a.__ray_ready__.remote() for a in self.actors])
            self.key = key
            self.starts += 1
        self.model_dir = model_dir

    def generate(self, model_dir: str | Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sample `rows` from `model_dir`: the engines take every `num_engines`-th request each (in calls
        of at most `eval.batch_size`), and the rows come back in input order with `tokens` and `text`."""
        import ray

        self._load(str(model_dir))
        params = [sampling_params(r, self.cfg) for r in rows]
        order = list(range(len(rows)))
        shards = [order[i::len(self.actors)] for i in range(len(self.actors))]
        step = self.cfg.batch_size
        calls = [(a, s[k:k + step]) for a, s in zip(self.actors, shards, strict=True) for k in range(0, len(s), step)]
        futures = [a.generate.remote([rows[i] for i in idx], [params[i] for i in idx]) for a, idx in calls]
        out: list[dict[str, Any] | None] = [None] * len(rows)
        for (_, idx), results in zip(calls, ray.get(futures), strict=True):
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]
