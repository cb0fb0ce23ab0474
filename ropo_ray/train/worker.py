"""The per-worker loop under Ray Train: one DeepSpeed engine per worker, reading only its argument.

Each worker streams its shard of the prepared pairs joined with the cached reference log-probs
(no reference model is loaded), runs the torch-only step (`ropo_ray.train.step`) through the engine,
reports rank-averaged metrics, evaluates the held-out shard, and checkpoints the trainable parameters
with the optimizer and scheduler state plus its data position, so a restarted group resumes there.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ropo_ray.adapters.inject import ropo_layers
from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config.schema import Config, native_model_runs
from ropo_ray.train.allocator import allocator_warning, loaded_allocator
from ropo_ray.train.checkpoints import write_record
from ropo_ray.train.ds_config import deepspeed_config
from ropo_ray.train.flops import StepFlopModel, batch_sizes, measure_peak_flops, step_flop_model
from ropo_ray.train.lean import keep_lean
from ropo_ray.train.model_io import cpu_bf16_warning, load_model
from ropo_ray.train.probe import penalised_objective, probe
from ropo_ray.train.reports import Reports
from ropo_ray.train.schedule import warmup_cosine_scheduler
from ropo_ray.train.step import evaluate_pairs, make_batch, preference_step

logger = logging.getLogger(__name__)
ENGINE_TAG = "engine"
STATE_FILE = "train_state.json"


EVAL_KEYS = ("eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracies",
             "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected")


def _mean_across_ranks(values: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Weighted mean of each metric over all ranks (weight = rows behind this rank's values).
    Every rank must pass the same keys: the all-reduce lines them up by position."""
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    total = float(t[-1])
    return {k: float(t[i]) / total if total else float("nan") for i, k in enumerate(keys)}


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS, ...) in MiB; None where /proc has no status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: VmHWM where /proc has it (Linux), else ru_maxrss."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def resident_mib() -> float:
    """This process's resident memory now, MiB (VmRSS); NaN where /proc has no status."""
    now = _status_mib("VmRSS")
    return float("nan") if now is None else now


def _max_across_ranks(*values: float) -> list[float]:
    """Each value's maximum over all ranks, in one all-reduce."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _evaluate(run: _Run) -> dict[str, float]:
    """Held-out loss and rewards (pair-weighted over ranks), the sampled probe when configured, and the
    sweep's objective `eval/objective`."""
    engine, pad_id, cfg = run.engine, run.pad_id, run.cfg
    batches = run.eval_shard.iter_batches(batch_size=256, batch_format="pyarrow")
    rows = [r for batch in batches for r in batch.to_pylist()]
    local = evaluate_pairs(engine.module, rows, pad_id, cfg.loss, shared_prompt=cfg.train.shared_prompt,
                           pad_multiple=cfg.train.pad_to_multiple) if rows else {}
    # a rank with no held-out rows still joins the all-reduce, with weight 0
    record = _mean_across_ranks({k: local.get(k, 0.0) for k in EVAL_KEYS}, float(len(rows)))
    if cfg.train.probe_prompts:
        record.update(_probe(engine, rows, pad_id, cfg, run.eos_id))
    record["eval/objective"] = penalised_objective(record, cfg.tune)
    return record


def _probe(engine: Any, rows: list[dict], pad_id: int, cfg: Config, eos_id: int | None) -> dict[str, float]:
    """The KL / length probe on this rank's first held-out prompts, averaged over ranks. Every rank
    samples the same number of prompts (cycling its own), so ZeRO-3 ranks stay in lockstep."""
    if eos_id is None:
        raise ValueError("train.probe_prompts needs the tokenizer's eos token id")
    prompts = sorted({tuple(r["prompt_ids"]) for r in rows}) or [(pad_id,)]
    prompts = [list(prompts[i % len(prompts)]) for i in range(cfg.train.probe_prompts)]
    synced = cfg.train.zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1
    local = probe(engine.module, prompts, pad_id, eos_id, cfg.train.probe_max_tokens, cfg.train.seed, synced)
    return _mean_across_ranks({f"eval/{k}": v for k, v in local.items()}, 1.0 if rows else 0.0)


def _save(engine: Any, reports: Reports, state: dict[str, Any], metrics: dict[str, float],
          export: dict[str, Any] | None = None) -> None:
    """Every rank saves its part (rank 0 the module's trainable weights, each rank its optimizer shard);
    with `export` (the final checkpoint) rank 0 adds the merged model."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=ENGINE_TAG, exclude_frozen_parameters=True)
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        if export is not None:
            _export(engine, export, Path(tmp))
            metrics = {**metrics, "peak_rss_mib": _max_across_ranks(peak_rss_mib())[0]}  # the export included
        context = ray.train.get_context()  # this rank's sizes and sha256 of its files, written last
        write_record(Path(tmp), context.get_world_rank(), context.get_world_size())
        reports.send(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(engine: Any) -> dict[str, Any]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(folder, tag=ENGINE_TAG, load_module_strict=False)
        return json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))


@dataclass
class _Run:
    """What one worker's loop carries between steps."""

    engine: Any
    cfg: Config
    pad_id: int
    total_steps: int
    world: int
    eval_shard: Any
    writer: Any
    reports: Reports
    state: dict[str, Any]
    flop_model: StepFlopModel
    peak_flops: float
    eos_id: int | None = None
    mark: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # time in training micro-batches (data included; evaluation and checkpoints not)
    pairs: int = 0
    tokens: int = 0
    flops: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)
    last_record: dict[str, float] = field(default_factory=dict)
    report_due: bool = True  # the ranks' common verdict at the last step: a plain report now would not wait
    # resident MiB when the loop started (Ray, torch, DeepSpeed and the code imported), had the adapted model, had
    # the engine; reported in the final record with the peak (where a worker's memory goes, BENCHMARKS.md)
    memory: dict[str, float] = field(default_factory=dict)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: cfg (Config), model_dir, pad_id, total_steps, tensorboard_dir."""
    import deepspeed
    import ray.train

    memory = {"memory/start_mib": resident_mib()}
    cfg: Config = config["cfg"]
    tc = cfg.train
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    torch.manual_seed(tc.seed)
    bf16 = tc.precision == "bf16"
    if (warning := cpu_bf16_warning(bf16, tc.use_gpu)) and ctx.get_world_rank() == 0:
        logger.warning(warning)
    if warning := allocator_warning(tc.allocator, loaded_allocator()):
        logger.warning(f"rank {ctx.get_world_rank()}: {warning}")
    ds_cfg = deepspeed_config(tc, ctx.get_world_size())
    if tc.lean_imports:
        keep_lean(ds_cfg, tc.use_gpu)  # before the model's imports
    model = attach_adapter(load_model(config["model_dir"], cfg.model, bf16=bf16, gpu=tc.use_gpu,
                                      allow_native=native_model_runs({cfg.adapter.type}, tc)), cfg.adapter)
    if tc.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    memory["memory/model_mib"] = resident_mib()
    flop_model = step_flop_model(model)
    peak = tc.peak_flops or measure_peak_flops(torch.bfloat16 if bf16 else torch.float32)
    scheduler = None if "scheduler" in ds_cfg else (
        lambda opt: warmup_cosine_scheduler(opt, config["total_steps"], tc.warmup_ratio))
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, lr_scheduler=scheduler,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    memory["memory/engine_mib"] = resident_mib()
    run = _Run(engine, cfg, config["pad_id"], config["total_steps"], ctx.get_world_size(),
               ray.train.get_dataset_shard("eval"), _tensorboard(config.get("tensorboard_dir"), ctx.get_world_rank()),
               Reports(ray.train.report), _restore(engine), flop_model, peak, config.get("eos_id"), memory=memory)
    train_shard = ray.train.get_dataset_shard("train")
    if run.state["step"] == 0:  # the step-0 policy is the reference: held-out DPO loss ln 2
        run.reports.send({"step": 0, **_evaluate(run)})
        run.mark = time.perf_counter()
    while run.state["epoch"] < tc.epochs and run.state["step"] < run.total_steps:
        _train_epoch(run, train_shard)
        if run.state["step"] < run.total_steps:
            run.state["epoch"], run.state["batches_in_epoch"] = run.state["epoch"] + 1, 0
    record = {**run.last_record, "step": run.state["step"], **_evaluate(run),
              **dict(zip(run.memory, _max_across_ranks(*run.memory.values())))}
    _log(run.writer, record)
    _save(engine, run.reports, run.state, record, export=config)


def _export(engine: Any, config: dict[str, Any], folder: Path) -> None:
    """Rank 0 writes the merged model and adapter weights into the final checkpoint (`export_model`).

    Only the trainable parameters are gathered (one at a time under ZeRO-3); the frozen base comes
    from the model folder on disk, so no rank ever holds the whole sharded model. A worker that trained
    `ropo_ray.train.llama`'s model has not imported transformers, which the export needs (the tokenizer and
    config files): it exports in a child process, so those imports never count against the worker.
    """
    import sys

    import deepspeed
    import ray.train

    cfg: Config = config["cfg"]
    trainable = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param], enabled=cfg.train.zero_stage == 3):
                trainable[name] = param.detach().cpu().clone()
    if ray.train.get_context().get_world_rank() != 0:
        return
    job = {"cfg": cfg, "model_dir": str(config["model_dir"]), "total_steps": config["total_steps"],
           "trainable": trainable, "layers": list(ropo_layers(engine.module)), "folder": str(folder)}
    if "transformers" in sys.modules:
        export_model(**job)
        return
    import subprocess

    with tempfile.TemporaryDirectory(prefix="ropo-export-") as tmp:
        torch.save(job, Path(tmp) / "job.pt")
        proc = subprocess.run([sys.executable, "-m", "ropo_ray.train.worker", "--export", str(Path(tmp) / "job.pt")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the export's child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def export_model(cfg: Config, model_dir: str, total_steps: int, trainable: dict[str, torch.Tensor],
                 layers: list[str], folder: str) -> None:
    """The merged model, adapter weights and config under `folder`/export. A RoPO model's merge is written
    tensor by tensor from the model folder (`export_streamed`): memory holds one weight at a time, not a second
    adapted model and its merged copy."""
    from ropo_ray.runs import export_run, export_streamed
    from ropo_ray.train.model_io import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer_path or model_dir, cfg.model)
    summary, out = {"step": total_steps}, Path(folder) / "export"
    if cfg.adapter.type == "ropo" and export_streamed(Path(model_dir), layers, trainable, tokenizer, cfg, out, summary):
        return
    fresh = attach_adapter(load_model(model_dir, cfg.model), cfg.adapter)
    missing = set(trainable) - set(dict(fresh.named_parameters()))
    if missing:
        raise RuntimeError(f"export: trained parameters not found in a fresh adapted model: {sorted(missing)[:3]}")
    fresh.load_state_dict(trainable, strict=False)
    export_run(fresh, tokenizer, cfg, out, summary)


def _train_epoch(run: _Run, train_shard: Any) -> None:
    """One pass over this worker's shard (from the saved position when resuming), until total_steps."""
    tc = run.cfg.train
    batches = train_shard.iter_batches(batch_size=tc.micro_batch_size, batch_format="pyarrow",
                                       local_shuffle_buffer_size=4 * tc.micro_batch_size,
                                       local_shuffle_seed=tc.seed + run.state["epoch"])
    for index, table in enumerate(batches):
        if index < run.state["batches_in_epoch"]:
            run.mark = time.perf_counter()
            continue  # consumed before the checkpoint this run resumed from
        batch = make_batch(table.to_pylist(), run.pad_id, tc.shared_prompt, tc.pad_to_multiple)
        loss, metrics = preference_step(run.engine, batch, run.cfg.loss)
        run.engine.backward(loss)
        boundary = run.engine.is_gradient_accumulation_boundary()
        run.engine.step()
        run.state["batches_in_epoch"] = index + 1
        tokens, length_sq = batch_sizes(batch["attention_mask"])
        run.pairs += table.num_rows
        run.tokens += tokens
        run.flops += run.flop_model.flops(tokens, length_sq)
        now = time.perf_counter()
        run.seconds, run.mark = run.seconds + now - run.mark, now
        for k, v in metrics.items():
            run.totals[k] = run.totals.get(k, 0.0) + v / tc.grad_accum_steps
        if not boundary:
            continue
        run.state["step"] += 1
        run.last_record = _step_record(run)
        if run.state["step"] >= run.total_steps:
            return  # the final evaluation, checkpoint and export follow the loop
        step, record = run.state["step"], run.last_record
        if step % tc.eval_every == 0:
            record.update(_evaluate(run))
        _log(run.writer, record)
        if step % tc.checkpoint_every == 0:
            _save(run.engine, run.reports, run.state, record)
        elif "eval/loss" in record:
            run.reports.send(record)
        elif step % tc.log_every == 0:
            run.reports.log(record, run.report_due)  # kept for the next report while one would wait
        run.mark = time.perf_counter()  # evaluation, checkpoints and reports are not training time


def _step_record(run: _Run) -> dict[str, float]:
    """Rank-averaged step metrics; throughput and MFU over this attempt's training time so far."""
    seconds = max(run.seconds, 1e-9)
    # model-FLOPs utilisation: the FLOPs the steps needed (flops.py) per second, over this worker's peak
    record = _mean_across_ranks({**run.totals, "mfu": run.flops / seconds / run.peak_flops})
    run.totals = {}
    peak, due = _max_across_ranks(peak_rss_mib(), float(run.reports.due()))
    run.report_due = due > 0
    grad_norm = run.engine.get_global_grad_norm()
    record.update({
        "step": run.state["step"], "epoch": run.state["epoch"], "lr": run.engine.get_lr()[0],
        "pid": os.getpid(),  # rank 0's process: a new one after the group restarts from a checkpoint
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "pairs_per_s": run.world * run.pairs / seconds, "tokens_per_s": run.world * run.tokens / seconds,
        "train_seconds": run.seconds,  # this rank's time in training micro-batches in this attempt so far
        "peak_rss_mib": peak,  # the largest worker's peak resident memory so far
        "orthogonality_error": max((m.orthogonality_error() for m in ropo_layers(run.engine.module).values()),
                                   default=0.0),
    })
    return record


class TensorBoardLog:
    """Rank 0's TensorBoard event file. A remote run folder gets the file written locally and
    uploaded after every flush (event files are small), so the store always holds the curve."""

    def __init__(self, location: str) -> None:
        from tensorboardX import SummaryWriter

        from ropo_ray.storage import Store

        self.store = Store(location)
        self.local = tempfile.mkdtemp(prefix="ropo-tb-") if self.store.remote else self.store.path
        self.writer = SummaryWriter(self.local)

    def log(self, record: dict[str, float]) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, int(record["step"]))
        self.writer.flush()
        if self.store.remote:
            self.store.upload(self.local)


def _tensorboard(location: str | None, rank: int) -> TensorBoardLog | None:
    return TensorBoardLog(location) if location and rank == 0 else None


def _log(writer: TensorBoardLog | None, record: dict[str, float]) -> None:
    if writer is not None:
        writer.log(record)


if __name__ == "__main__":  # the export's child process (`_export`): python -m ropo_ray.train.worker --export JOB
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--export":
        raise SystemExit("usage: python -m ropo_ray.train.worker --export JOB (written by a training worker)")
    export_model(**torch.load(sys.argv[2], weights_only=False))  # our own file, written by the worker
