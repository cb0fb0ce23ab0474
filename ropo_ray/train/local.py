"""Single-process RoPO training: the plain torch loop (no Ray), for the embedded default and tests.

The same step function (`ropo_ray.train.step`) runs inside the Ray Train workers; here it runs in
one process with torch's AdamW, so the maths can be watched without any distributed machinery.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ropo_ray.adapters.inject import ropo_layers, trainable_report
from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config.schema import Config
from ropo_ray.train.schedule import warmup_cosine_scheduler
from ropo_ray.train.step import evaluate_pairs, make_batch, preference_step


@dataclass
class TrainResult:
    """What a training run produced: the trained model, its metric history and its summary."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


def _batches(rows: list[dict], size: int, rng: random.Random) -> list[list[dict]]:
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [[rows[i] for i in order[s:s + size]] for s in range(0, len(order), size)]


def orthogonality_error(model: nn.Module) -> float:
    """Worst ||Q^T Q - I|| over the model's RoPO layers (0.0 for other adapters)."""
    return max((layer.orthogonality_error() for layer in ropo_layers(model).values()), default=0.0)


def train_local(model: nn.Module, train_rows: list[dict], eval_rows: list[dict], pad_id: int, cfg: Config,
                log: Callable[[str], None] = print) -> TrainResult:
    """Attach the configured adapter and train it on rows carrying cached reference log-probs."""
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    model = attach_adapter(model, cfg.adapter)
    report = trainable_report(model)
    log(f"adapter {cfg.adapter.type}: {report['trainable']:,} trainable of {report['base']:,} "
        f"({report['percent']:.4f}%)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    tc = cfg.train
    steps_per_epoch = math.ceil(len(train_rows) / (tc.micro_batch_size * tc.grad_accum_steps))
    total = min(tc.max_steps or steps_per_epoch * tc.epochs, steps_per_epoch * tc.epochs)
    scheduler = warmup_cosine_scheduler(optimizer, total, tc.warmup_ratio)
    result = TrainResult(model=model)
    start_eval = evaluate_pairs(model, eval_rows, pad_id, cfg.loss, shared_prompt=tc.shared_prompt,
                                pad_multiple=tc.pad_to_multiple)
    result.history.append({"step": 0, **start_eval})
    log(f"step 0: eval/loss {start_eval['eval/loss']:.4f} "
        f"eval/rewards/accuracies {start_eval['eval/rewards/accuracies']:.3f}")
    step, t0, pairs_seen = 0, time.perf_counter(), 0
    model.train()
    while step < total:
        micro = _batches(train_rows, tc.micro_batch_size, rng)
        for i in range(0, len(micro) - tc.grad_accum_steps + 1, tc.grad_accum_steps):
            metrics = _optimizer_step(model, micro[i:i + tc.grad_accum_steps], pad_id, cfg, params, optimizer)
            scheduler.step()
            step += 1
            pairs_seen += sum(len(b) for b in micro[i:i + tc.grad_accum_steps])
            record = {"step": step, **metrics, "lr": scheduler.get_last_lr()[0],
                      "pairs_per_s": pairs_seen / (time.perf_counter() - t0)}
            if step % tc.eval_every == 0 or step == total:
                record.update(evaluate_pairs(model, eval_rows, pad_id, cfg.loss, shared_prompt=tc.shared_prompt,
                                             pad_multiple=tc.pad_to_multiple))
                record["orthogonality_error"] = orthogonality_error(model)
            if step % tc.log_every == 0 or "eval/loss" in record:
                result.history.append(record)
                log(_format(record))
            if step >= total:
                break
    final = result.history[-1]
    result.summary = {
        "steps": step, "seconds": time.perf_counter() - t0, "trainable_params": report["trainable"],
        "trainable_percent": report["percent"], "first_train_loss": _first(result.history, "loss"),
        "final_train_loss": final.get("loss", math.nan), "start_eval_loss": start_eval["eval/loss"],
        "final_eval_loss": final["eval/loss"], "start_eval_accuracy": start_eval["eval/rewards/accuracies"],
        "final_eval_accuracy": final["eval/rewards/accuracies"],
    }
    return result


def _optimizer_step(model: nn.Module, micro_batches: list[list[dict]], pad_id: int, cfg: Config,
                    params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    totals: dict[str, float] = {}
    for rows in micro_batches:
        batch = make_batch(rows, pad_id, cfg.train.shared_prompt, cfg.train.pad_to_multiple)
        loss, metrics = preference_step(model, batch, cfg.loss)
        (loss / len(micro_batches)).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / len(micro_batches)
    max_norm = cfg.train.max_grad_norm or float("inf")
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _first(history: list[dict[str, float]], key: str) -> float:
    return next((h[key] for h in history if key in h), math.nan)


def _format(record: dict[str, float]) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr", "pairs_per_s", "eval/loss",
            "eval/rewards/accuracies", "orthogonality_error")
    parts = [f"{k} {record[k]:.4g}" for k in keys if k in record]
    return f"step {int(record['step'])}: " + "  ".join(parts)
