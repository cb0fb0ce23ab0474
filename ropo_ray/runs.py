"""Shared wiring of a run's stages: resolve the model, prepare the pairs and fill the reference cache
(Ray Data), train, export. `pipelines/ropo_full.py` and `ropo-ray` both call these.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ropo_ray.adapters.registry import merge_adapter
from ropo_ray.config import Config, save_config
from ropo_ray.storage import Store
from ropo_ray.train.model_io import check_model_folder, load_tokenizer, save_model_folder

Log = Callable[[str], None]


def demo_model_dir(cfg: Config) -> Path:
    """Where the built-in task's tiny SFT model lives (shared by every run using the same artifacts)."""
    return Path(cfg.pipeline.artifacts_dir) / "demo-model"


HUB_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*",
             "special_tokens_map.json", "chat_template.jinja", "*.model")


def resolve_model(cfg: Config, log: Log = print) -> Path:
    """The reference model folder: the configured one, a hub model (downloaded once, safetensors and
    tokenizer files only), or the built-in task's (built when missing)."""
    if cfg.model.path or cfg.model.hub_id:
        folder = Path(cfg.model.path) if cfg.model.path else _download(cfg, log)
        # A folder without safetensors, or a tokenizer without a chat template, fails here, before Ray starts.
        check_model_folder(folder, cfg.model)
        load_tokenizer(tokenizer_dir(cfg, folder), cfg.model)
        return folder
    from ropo_ray.train.demo_model import build_demo_model

    info = build_demo_model(cfg.task, demo_model_dir(cfg), log=log)
    log(f"demo model: {info['num_params']:,} params, verifier accuracy {info['verifier_accuracy']:.3f}, "
        f"probe accuracy {info['probe_accuracy']:.3f}")
    return demo_model_dir(cfg)


def _download(cfg: Config, log: Log) -> Path:
    """The hub model's safetensors and tokenizer files, once, under <artifacts_dir>/hub/."""
    from huggingface_hub import snapshot_download

    target = Path(cfg.pipeline.artifacts_dir) / "hub" / cfg.model.hub_id.replace("/", "__") / cfg.model.revision
    log(f"model: {cfg.model.hub_id}@{cfg.model.revision} -> {target}")
    snapshot_download(cfg.model.hub_id, revision=cfg.model.revision, local_dir=str(target),
                      allow_patterns=list(HUB_FILES))
    return target


def tokenizer_dir(cfg: Config, model_dir: Path) -> Path:
    return Path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else model_dir


def input_files(cfg: Config, model_dir: Path) -> tuple[str, ...]:
    """The preference files: the configured ones, or the built-in task's pairs."""
    return cfg.data.train_files or (str(model_dir / "task" / "pairs.jsonl"),)


def run_store(cfg: Config) -> Store:
    """The run folder: a local path or an object-store URI (ropo_ray.storage)."""
    return Store(cfg.pipeline.run_dir)


def prepared_dir(cfg: Config) -> Store:
    return run_store(cfg).child("data")


def report_dir(cfg: Config) -> Store:
    return Store(cfg.eval.report_dir) if cfg.eval.report_dir else run_store(cfg).child("report")


def mirror_dir(cfg: Config) -> Path:
    """Local disk for copies of remote folders that must be local files (exported models, read by
    transformers and vLLM)."""
    return Path(cfg.pipeline.artifacts_dir) / "mirror"


def connect_ray(log: Log = print) -> None:
    """Join the Ray cluster named by RAY_ADDRESS (a job's cluster); start a local one only when there is none.

    A local Ray started here binds its dashboard to 127.0.0.1. Either way the job's workers are told
    the cluster's address (`address_env`).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        ray.init(address=address, log_to_driver=True, runtime_env=address_env(address))
        log(f"ray: joined the cluster at {address}")
        return
    context = start_local_ray(logging_level="WARNING")
    log(f"ray: started a local cluster; dashboard at http://{context.dashboard_url}")


def address_env(address: str) -> dict[str, Any] | None:
    """A job runtime env naming the cluster's address to every worker of the job (RAY_ADDRESS).

    Ray Train V2's placement-group cleaner (a detached actor) asks the state API whether the run's
    controller is alive; with no address given that API looks for the GCS among this machine's
    processes, and with two Ray instances on one machine (two local pipelines, or a test run beside a
    benchmark) it fails with "Found multiple active Ray instances". Not for a Ray Client address
    (ray://) or "auto", nor when a submitted job's own runtime env sets it (Ray refuses to merge a key
    set twice)."""
    if address.startswith("ray://") or address == "auto":
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


def start_local_ray(**options: Any) -> Any:
    """Start a local Ray (dashboard on 127.0.0.1) whose workers know its address (`address_env`).

    The GCS port is chosen before Ray starts (Ray's head reads RAY_GCS_SERVER_PORT; one the user set is
    kept), so the address can go in the job's runtime env."""
    import socket

    import ray

    port = os.environ.get("RAY_GCS_SERVER_PORT")
    chosen = not port
    if chosen:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        os.environ["RAY_GCS_SERVER_PORT"] = port
    try:
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1",
                           runtime_env=address_env(f"127.0.0.1:{port}"), **options)
    finally:
        if chosen:
            del os.environ["RAY_GCS_SERVER_PORT"]
    if not context.address_info["gcs_address"].endswith(f":{port}"):
        raise RuntimeError(f"Ray started its GCS at {context.address_info['gcs_address']}, not on port {port}")
    return context


def run_prepare(cfg: Config, model_dir: Path, log: Log = print) -> dict[str, Any]:
    """The Ray Data preparation of the configured (or built-in) pairs into <run>/data."""
    from ropo_ray.data.prepare import prepare

    return prepare(cfg, str(tokenizer_dir(cfg, model_dir)), prepared_dir(cfg), input_files(cfg, model_dir), log=log)


def run_cache(cfg: Config, model_dir: Path, log: Log = print) -> dict[str, Any]:
    """Reference log-probs of every prepared pair, into the shared cache (a hit costs no forward)."""
    from ropo_ray.refcache.stage import build_cache

    return build_cache(cfg, model_dir, tokenizer_dir(cfg, model_dir), prepared_dir(cfg), log=log)


def joined_rows(cfg: Config, cache_dir: str | Path | Store, split: str) -> list[dict]:
    """Prepared rows of `split` joined with their cached reference log-probs by pair_id (one process)."""

    from ropo_ray.refcache.store import read_entries

    cache = {r["pair_id"]: r for r in read_entries(cache_dir).to_pylist()}
    columns = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]
    dataset = prepared_dir(cfg).child(split).parquet_dataset()
    rows = dataset.to_table(columns=columns).to_pylist() if dataset is not None else []
    missing = [r["pair_id"] for r in rows if r["pair_id"] not in cache]
    if missing:
        raise ValueError(f"{len(missing)} {split} pairs have no cached reference log-probs (first: {missing[0]}); "
                         "run the cache stage")
    return [{**r, **cache[r["pair_id"]]} for r in rows]


def train_run_name(cfg: Config, cache_key: str) -> str:
    """A training run's name: a hash of everything that changes what it trains, so rerunning the same
    configuration resumes (or skips) that run, and a changed one starts fresh."""
    from ropo_ray.fingerprint import hash_json, training_settings

    return f"train-{hash_json({**training_settings(cfg), 'cache': cache_key})[:12]}"


def compare_configs(cfg: Config, run_dir: Store) -> list[tuple[str, Config, Store]]:
    """The baselines of `pipeline.compare_runs`: (label, config, run folder) each, trained from the same
    reference, prepared data and cache as the main run, in run_dir/compare/<i>-<adapter>-<loss>."""
    from ropo_ray.config.load import with_overrides

    out = []
    for i, spec in enumerate(cfg.pipeline.compare_runs):
        run_cfg = with_overrides(cfg, [*spec.split(), "pipeline.compare_runs=[]", "tune.enabled=false"])
        label = f"{run_cfg.adapter.type}-{run_cfg.loss.type}"
        out.append((label, run_cfg, run_dir.child("compare", f"{i}-{label}")))
    return out


def export_run(model: nn.Module, tokenizer: Any, cfg: Config, out_dir: Path, summary: dict) -> Path:
    """The merged model (plain HF folder), the adapter-only weights and the config that made them.

    The merge runs on a deep copy of `model` (`export_streamed` writes a RoPO model's merge from its
    checkpoint folder instead, without a second copy). Published atomically: written to a temporary
    sibling, then renamed into place.
    """
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    merged = merge_adapter(copy.deepcopy(model), cfg.adapter.type)
    return _publish(Path(out_dir), trainable, cfg, summary,
                    lambda folder: save_model_folder(merged, tokenizer, folder))


def export_streamed(model_dir: Path, layers: list[str], trainable: dict[str, torch.Tensor], tokenizer: Any,
                    cfg: Config, out_dir: Path, summary: dict) -> Path | None:
    """`export_run` for a RoPO model, written tensor by tensor from the folder its base weights came from.

    `layers`: the adapted layers' module names; `trainable`: their trained parameters (`<layer>.rotation.<k>`,
    `<layer>.magnitude`). Each safetensors file of `model_dir` is rewritten under the same name, its tensors
    in `model.dtype` (what `load_model` gives the model), each adapted layer's weight replaced by the
    merged weight diag(m / c) W R^T of a RoPOLinear built around it (`merged_weight`, the same computation
    `merge_ropo` does on a whole model). Memory holds one tensor and its merge, where `export_run` holds
    a second model and its deep copy: a training worker's peak rose by 378 MiB for a 196 MiB float32 model,
    and by 4 MiB streamed (BENCHMARKS.md, session 17). None, to leave the export to `export_run`, when
    the folder does not hold each adapted weight under `<layer>.weight`, holds a tensor that is not floating
    point, or a trained parameter belongs to no adapted layer.
    """
    from ropo_ray.adapters.ropo_linear import RoPOLinear
    from ropo_ray.train.model_io import (
        DTYPES,
        SAFETENSORS_DTYPES,
        read_tensor,
        safetensors_header,
        tensor_buffer,
        write_safetensors,
    )

    folder, dtype = Path(model_dir), DTYPES[cfg.model.dtype]
    headers = {file: safetensors_header(file) for file in sorted(folder.glob("*.safetensors"))}
    stored = {name: entry for header in headers.values() for name, entry in header.items()}
    by_weight = {f"{layer}.weight": layer for layer in layers}
    owned = [name for name in trainable if any(name.startswith(f"{layer}.") for layer in layers)]
    if (not headers or any(w not in stored for w in by_weight) or len(owned) != len(trainable)
            or any(entry["dtype"] not in SAFETENSORS_DTYPES for entry in stored.values())):
        return None
    ac = cfg.adapter

    def merged(name: str, weight: torch.Tensor) -> torch.Tensor:
        layer = by_weight[name]
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        base.weight = nn.Parameter(weight, requires_grad=False)
        ropo = RoPOLinear(base, ac.block_sizes, ac.mixing, ac.cayley, ac.neumann_terms, ac.learn_magnitude,
                          kernel="torch")
        own = {name[len(layer) + 1:]: value for name, value in trainable.items() if name.startswith(f"{layer}.")}
        expected = {n for n, p in ropo.named_parameters() if p.requires_grad}
        if set(own) != expected:
            raise ValueError(f"export: the trained parameters of {layer} are {sorted(own)}; a RoPO layer with "
                             f"adapter.block_sizes={list(ac.block_sizes)}, learn_magnitude={ac.learn_magnitude} "
                             f"has {sorted(expected)}")
        ropo.load_state_dict(own, strict=False)
        return ropo.merged_weight()

    def write(out: Path) -> None:
        from transformers import AutoConfig, GenerationConfig

        out.mkdir(parents=True)
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
        config.dtype = dtype
        config.save_pretrained(str(out))
        if (folder / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(folder)).save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        buffer, sizes = tensor_buffer(headers), {}
        for file, header in headers.items():
            names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
            layout = [(name, dtype, tuple(header[name]["shape"])) for name in names]

            def tensors(f: Any, file: Path = file, header: dict = header, names: list[str] = names):
                for name in names:
                    tensor = read_tensor(f, file, name, header[name], buffer).to(dtype, copy=True)
                    yield merged(name, tensor) if name in by_weight else tensor

            with torch.no_grad(), file.open("rb", buffering=0) as f:
                sizes[file.name] = write_safetensors(out / file.name, layout, tensors(f), {"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # sharded: the same shards, their new total size
            content = json.loads(index.read_text(encoding="utf-8"))
            content.setdefault("metadata", {})["total_size"] = sum(sizes.values())
            (out / index.name).write_text(json.dumps(content, indent=2), encoding="utf-8")

    return _publish(Path(out_dir), {n: trainable[n].detach().contiguous().cpu() for n in trainable}, cfg, summary,
                    write)


def _publish(out_dir: Path, trainable: dict[str, torch.Tensor], cfg: Config, summary: dict,
             write_merged: Callable[[Path], None]) -> Path:
    """Write <out_dir>/merged (by `write_merged`), adapter.safetensors, config.yaml and summary.json into a
    temporary sibling, then rename it into place."""
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    write_merged(tmp / "merged")
    save_file(trainable, str(tmp / "adapter.safetensors"))
    save_config(cfg, tmp / "config.yaml")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def set_threads() -> int:
    """Give torch every core this process may run on, unless OMP_NUM_THREADS says otherwise (Ray sets
    it to a task's CPU share, and torch already follows it)."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


class StageTimer:
    """Prints the stage a run is in and how long each took: `with timer("train"): ...`."""

    def __init__(self, log: Log = print) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> StageTimer:
        self._name = name
        return self

    def __enter__(self) -> StageTimer:
        import time

        self.log(f"== stage: {self._name}")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        self.seconds[self._name] = time.perf_counter() - self._t0
        self.log(f"== stage {self._name}: {self.seconds[self._name]:.1f} s")
