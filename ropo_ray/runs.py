"""Shared wiring of a run's stages (single process for now): resolve the model, tokenise the pairs,
attach reference log-probs, train, export. `pipelines/ropo_full.py` and `ropo-ray` both call these.
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
from ropo_ray.config import Config, ConfigError, save_config
from ropo_ray.data.pairs import is_eval_pair, tokenize_rows
from ropo_ray.refcache.compute import reference_logps
from ropo_ray.train.model_io import save_model_folder

Log = Callable[[str], None]


def demo_model_dir(cfg: Config) -> Path:
    """Where the built-in task's tiny SFT model lives (shared by every run using the same artifacts)."""
    return Path(cfg.pipeline.artifacts_dir) / "demo-model"


def resolve_model(cfg: Config, log: Log = print) -> Path:
    """The reference model folder: the configured one, or the built-in task's (built when missing)."""
    if cfg.model.path:
        return Path(cfg.model.path)
    from ropo_ray.train.demo_model import build_demo_model

    info = build_demo_model(cfg.task, demo_model_dir(cfg), log=log)
    log(f"demo model: {info['num_params']:,} params, verifier accuracy {info['verifier_accuracy']:.3f}, "
        f"probe accuracy {info['probe_accuracy']:.3f}")
    return demo_model_dir(cfg)


def read_pairs(cfg: Config, model_dir: Path) -> list[dict]:
    """Preference rows {prompt, chosen, rejected}: the built-in task's pairs when no files are configured."""
    if cfg.data.train_files:
        raise ConfigError("data.train_files: external datasets are read by the Ray Data preparation stage, "
                          "which this version does not have yet; leave it empty for the built-in task")
    path = model_dir / "task" / "pairs.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_rows(tokenizer: Any, pairs: list[dict], cfg: Config, log: Log = print) -> tuple[list[dict], list[dict]]:
    """Tokenise and split by pair_id into (train, eval)."""
    rows, rejects = tokenize_rows(tokenizer, pairs, cfg.data)
    if rejects:
        log(f"rejected {len(rejects)} of {len(pairs)} pairs: {rejects[0]['detail']} ...")
    train = [r for r in rows if not is_eval_pair(r["pair_id"], cfg.data.eval_fraction)]
    evals = [r for r in rows if is_eval_pair(r["pair_id"], cfg.data.eval_fraction)]
    return train, evals


def attach_reference(model: nn.Module, rows: list[dict], pad_id: int) -> list[dict]:
    """Rows joined with their reference log-probs (computed here with the frozen reference model)."""
    return [{**row, **ref} for row, ref in zip(rows, reference_logps(model, rows, pad_id))]


def export_run(model: nn.Module, tokenizer: Any, cfg: Config, out_dir: Path, summary: dict) -> Path:
    """The merged model (plain HF folder), the adapter-only weights and the config that made them.

    Published atomically: written to a temporary sibling, then renamed into place.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    merged = merge_adapter(copy.deepcopy(model), cfg.adapter.type)
    save_model_folder(merged, tokenizer, tmp / "merged")
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
