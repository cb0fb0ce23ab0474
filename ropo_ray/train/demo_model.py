"""Build the embedded default's reference model: task data, tokenizer, tiny Llama, SFT, evaluation.

The result is an ordinary HF model folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja) that `AutoModelForCausalLM` / `AutoTokenizer` and vLLM
load with no project code, plus `task/*.jsonl` (the generated data) and `demo_model.json` (the
fingerprint and the SFT model's metrics).

Like every stage, it publishes atomically: everything is written into a temporary sibling folder
that is renamed into place only when complete, so a crash never leaves a folder a later run would
trust. A folder whose `demo_model.json` carries the same fingerprint is reused as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from ropo_ray.config.schema import TaskConfig
from ropo_ray.data.task import generate_task, write_task
from ropo_ray.data.tokenizer import train_tokenizer
from ropo_ray.train.sft import build_model, collate, completion_nll, encode_sft, evaluate, train_sft

BUILDER_VERSION = 2
"""Bump when the task generator, tokenizer or SFT recipe changes what a TaskConfig builds, so folders
built by older code stop matching."""
MANIFEST = "demo_model.json"
WEIGHTS = "model.safetensors"


def task_fingerprint(cfg: TaskConfig) -> str:
    """sha256 of the TaskConfig (and BUILDER_VERSION) as sorted JSON: what decides the folder's content."""
    payload = {"builder_version": BUILDER_VERSION, "task": dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _reusable(out_dir: Path, fingerprint: str) -> dict | None:
    """The published manifest if it matches `fingerprint` and its weights exist, else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint or not (out_dir / WEIGHTS).is_file():
        return None
    return manifest


@torch.no_grad()
def _mean_loss(model, examples: list, pad_id: int, batch_size: int = 64) -> float:
    """Mean NLL per completion token over `examples` (the same measure the SFT loop reports)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        total += float(completion_nll(model, batch).sum())
        tokens += int(batch["completion_mask"].sum())
    return total / tokens


def _build(cfg: TaskConfig, folder: Path, fingerprint: str, log: Callable[[str], None]) -> dict:
    """Generate, train, evaluate and save everything into `folder` (not yet published)."""
    start = time.perf_counter()
    task = generate_task(cfg)
    tokenizer = train_tokenizer((m["content"] for row in task.sft for m in row["messages"]), cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    log(f"demo model: {len(task.sft)} SFT rows, vocab {len(tokenizer)}, {num_params:,} parameters")
    examples = encode_sft(tokenizer, task.sft)
    sample = examples[:256]
    loss_before = _mean_loss(model, sample, tokenizer.pad_token_id)
    result = train_sft(model, examples, cfg, log=log)
    metrics = evaluate(model, tokenizer, task)
    manifest = {
        "fingerprint": fingerprint, "builder_version": BUILDER_VERSION, "task_config": dataclasses.asdict(cfg),
        "num_params": num_params, "vocab_size": len(tokenizer), "sft_seconds": round(result["seconds"], 2),
        "sft_steps": result["steps"], "sft_epoch_losses": result["epoch_losses"],
        "sample_loss_before_sft": loss_before,
        "sample_loss_after_sft": _mean_loss(model, sample, tokenizer.pad_token_id),
        **metrics,
        "build_seconds": round(time.perf_counter() - start, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_task(task, folder / "task")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log(f"demo model: held-out verifier accuracy {metrics['verifier_accuracy']:.3f}, probe accuracy "
        f"{metrics['probe_accuracy']:.3f}, probe NLL {metrics['probe_nll']:.3f} ({manifest['build_seconds']} s)")
    return manifest


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap `tmp` into `out_dir`: move any old folder aside, rename, then delete the old one."""
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_demo_model(cfg: TaskConfig, out_dir: Path, force: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the demo SFT model in `out_dir`; returns its manifest plus `reused`."""
    out_dir = Path(out_dir)
    fingerprint = task_fingerprint(cfg)
    cached = None if force else _reusable(out_dir, fingerprint)
    if cached is not None:
        log(f"demo model: reusing {out_dir} (fingerprint {fingerprint[:12]})")
        return {**cached, "reused": True}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _build(cfg, tmp, fingerprint, log)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "reused": False}
