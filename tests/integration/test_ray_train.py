"""Ray Train + DeepSpeed workers: loss from ln 2 down, ZeRO-2 and ZeRO-3, export, resume."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ropo_ray.config import load_config
from ropo_ray.config.training import TrainConfig
from ropo_ray.runs import joined_rows
from ropo_ray.train.allocator import loaded_allocator
from ropo_ray.train.model_io import load_model, load_tokenizer
from ropo_ray.train.ray_trainer import FinishedRun, read_metrics, train_ray
from ropo_ray.train.step import evaluate_pairs


def run(data, tiny_assets, run_dir, overrides, name="train"):
    root, base, cache_dir = data
    cfg = load_config(None, [*base, "train.eval_every=5", "train.log_every=1", *overrides])
    return cfg, train_ray(cfg, Path(tiny_assets), Path(cache_dir), root / "data", run_dir, name=name,
                          log=lambda s: None)


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes (their title is ray::RayTrainWorker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return sorted(pids)


def history(run_dir, name="train"):
    return read_metrics(run_dir / f"{name}_metrics.jsonl")


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_starts_at_ln2_falls_and_export_matches(polite_data, tiny_assets, tmp_path, stage):
    cfg, result = run(polite_data, tiny_assets, tmp_path, [f"train.zero_stage={stage}", "train.num_workers=2",
                                                     "train.micro_batch_size=8"])
    records = history(tmp_path)
    first_eval = next(r for r in records if r["step"] == 0)
    assert abs(first_eval["eval/loss"] - math.log(2)) <= 1e-5
    assert result.metrics["eval/loss"] < math.log(2) - 0.1
    assert result.metrics["eval/rewards/accuracies"] >= 0.9
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
    peaks = [r["peak_rss_mib"] for r in records if "peak_rss_mib" in r]
    # one process per rank throughout: a peak never falls (by more than the few pages Linux's per-CPU RSS
    # counters may lag by when read; a new process would start hundreds of MiB lower)
    assert len(peaks) >= 2 and all(later > earlier - 1 for earlier, later in zip(peaks, peaks[1:]))
    assert result.metrics["peak_rss_mib"] >= peaks[-1] > 100  # torch alone holds more than 100 MiB resident
    # where the memory went: resident at the loop's start (torch imported), with the model, with the engine; each
    # at most the final peak. The workers build ropo_ray.train.llama's model (model.implementation=auto), which
    # imports no transformers code: the model's point is above the start's by little more than its weights
    # (the merged export below, written by a child process that does import transformers, checks the rest).
    stages = [result.metrics[f"memory/{s}_mib"] for s in ("start", "model", "engine")]
    assert stages[0] > 100 and 0 < stages[1] - stages[0] < 60 and max(stages) <= result.metrics["peak_rss_mib"]
    seconds = [r["train_seconds"] for r in records if "train_seconds" in r]
    assert seconds == sorted(seconds) and seconds[0] > 0  # time in training steps only accumulates
    # log_every=1: every step's record reaches the log once, in order, though records made while a report
    # would have waited for the controller's poll travel together (ropo_ray.train.reports)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, result.metrics["step"] + 1))
    assert len({r["report"] for r in records}) < len(records)
    assert "earlier_records" not in result.metrics
    merged = load_model(tmp_path / "model" / "merged", cfg.model)
    # the exported weights reproduce the trained policy's held-out loss
    rows = joined_rows(load_config(None, [f"pipeline.run_dir={polite_data[0]}"]), polite_data[2], "eval")
    again = evaluate_pairs(merged, rows, load_tokenizer(tiny_assets, cfg.model).pad_token_id, cfg.loss)
    assert abs(again["eval/loss"] - result.metrics["eval/loss"]) < 1e-4


def test_resume_a_finished_run_to_twice_its_steps(polite_data, tiny_assets, tmp_path):
    """A run stopped at step K (max_steps) continues from its checkpoint to 2K: no step <= K is trained again."""
    common = ["train.num_workers=1", "train.micro_batch_size=8", "train.checkpoint_every=3", "train.epochs=3"]
    _, finished = run(polite_data, tiny_assets, tmp_path, [*common, "train.max_steps=6"], name="resume")
    first = history(tmp_path, "resume")
    assert max(r["step"] for r in first) == 6
    # the same run again is skipped: its published export is up to date, nothing is trained or logged
    _, skipped = run(polite_data, tiny_assets, tmp_path, [*common, "train.max_steps=6"], name="resume")
    assert isinstance(skipped, FinishedRun) and skipped.metrics["step"] == 6
    assert skipped.metrics["eval/loss"] == finished.metrics["eval/loss"]
    assert history(tmp_path, "resume") == first
    _, result = run(polite_data, tiny_assets, tmp_path, [*common, "train.max_steps=12"], name="resume")
    second = history(tmp_path, "resume")[len(first):]
    trained = [r["step"] for r in second if "loss" in r]
    assert trained and min(trained) == 7 and max(trained) == 12
    assert not any(r["step"] == 0 for r in second)  # no fresh start
    assert result.metrics["step"] == 12


def test_killed_worker_resumes_from_checkpoint_and_finishes(polite_data, tiny_assets, tmp_path):
    """SIGKILL one training worker's process after the first checkpoint: FailureConfig restarts the group
    from that checkpoint (no fresh start), the run finishes, and its final held-out loss matches an
    uninterrupted run's within 0.02 (data order after a restart may differ, so not bit for bit). The workers
    run on the allocator asked for: jemalloc mapped into both processes (the runtime env's LD_PRELOAD), with
    train.jemalloc_conf in their environment; without Triton (train.lean_imports); at niceness 0."""
    common = ["train.num_workers=2", "train.micro_batch_size=8", "train.checkpoint_every=4", "train.max_failures=2",
              "train.allocator=jemalloc"]
    _, clean = run(polite_data, tiny_assets, tmp_path / "clean", common, name="clean")
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(
        result=run(polite_data, tiny_assets, tmp_path / "killed", common, name="killed")[1]))
    thread.start()
    log = tmp_path / "killed" / "killed_metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not any(r.get("checkpoint") for r in read_metrics(log)):
        time.sleep(0.2)
    killed_at = max(r["step"] for r in read_metrics(log))
    workers = train_worker_pids()
    assert len(workers) == 2
    maps = [Path(f"/proc/{pid}/maps").read_text() for pid in workers]
    assert [loaded_allocator(m) for m in maps] == ["jemalloc"] * 2
    # train.lean_imports (default): the model is loaded and training, and Triton stayed out of the CPU workers
    assert all("libtorch_cpu" in m and "libtriton" not in m for m in maps)
    conf = f"MALLOC_CONF={TrainConfig().jemalloc_conf}".encode()  # jemalloc's options came with it
    assert all(conf in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in workers)
    # train.worker_niceness (default 0): the workers run at that niceness, not at the 15 Ray gives workers
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in workers] == [TrainConfig().worker_niceness] * 2 == [0, 0]
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=900)
    result, records = box["result"], read_metrics(log)
    assert sum(1 for r in records if r["step"] == 0) == 1  # resumed, never restarted from scratch
    # the group was restarted: rank 0 ran in two processes, against one in the uninterrupted run
    assert len({r["pid"] for r in records if "pid" in r}) == 2
    assert len({r["pid"] for r in read_metrics(tmp_path / "clean" / "clean_metrics.jsonl") if "pid" in r}) == 1
    steps = [r["step"] for r in records if "loss" in r]
    assert steps[-1] == clean.metrics["step"] > killed_at
    with pytest.raises(ProcessLookupError):  # the worker really died; the group finished without it
        os.kill(workers[-1], 0)
    assert abs(result.metrics["eval/loss"] - clean.metrics["eval/loss"]) < 0.02
    assert result.metrics["eval/loss"] < math.log(2) - 0.1


def test_two_workers_match_one_worker_with_twice_the_batch(polite_data, tiny_assets, tmp_path):
    """Data parallelism changes nothing but speed: 2 workers x b, 1 worker x 2b, and 1 worker x b with 2
    accumulated micro-batches (under activation checkpointing, which must work with only adapters
    training) give the same loss at every step. Each step takes the whole training set (b = half of it),
    so every configuration averages the gradient over the same pairs whatever order the shards arrive in;
    what is left is float summation order (about 1e-7 seen), far below the 1e-5 allowed."""
    rows = joined_rows(load_config(None, [f"pipeline.run_dir={polite_data[0]}"]), polite_data[2], "train")
    assert len(rows) % 2 == 0, "the shared fixture must have an even number of training pairs"
    half = len(rows) // 2
    common = ["train.epochs=6", "train.eval_every=100", "train.checkpoint_every=100"]
    configs = {
        "2x b": ["train.num_workers=2", f"train.micro_batch_size={half}"],
        "1x 2b": ["train.num_workers=1", f"train.micro_batch_size={2 * half}"],
        "1x b, accum 2, ckpt": ["train.num_workers=1", f"train.micro_batch_size={half}", "train.grad_accum_steps=2",
                                "train.activation_checkpointing=true"],
    }
    losses = {}
    for index, (label, overrides) in enumerate(configs.items()):
        name = f"equiv{index}"
        run(polite_data, tiny_assets, tmp_path, [*common, *overrides], name=name)
        records = [r for r in history(tmp_path, name) if "loss" in r]
        losses[label] = [r["loss"] for r in records]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], label
        assert all(0 < r["mfu"] < 1 for r in records), label
    reference = losses["1x 2b"]
    assert reference[-1] < reference[0] - 0.1  # the trajectory compared is a real descent
    for label, trajectory in losses.items():
        assert trajectory == pytest.approx(reference, abs=1e-5), label
