"""Faults: the pipeline driver killed in each stage in turn, and checkpoints or exports altered after
they were published. (A crashing sweep trial is in test_sweep.py, beside the other sweeps.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from ropo_ray.config import load_config
from ropo_ray.refcache.store import verify
from ropo_ray.train.checkpoints import CheckpointCorrupt, verify_checkpoint
from ropo_ray.train.ray_trainer import FinishedRun, read_metrics, train_ray, training_datasets
from tests.integration.test_demo_model import SMALL

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PAIRS = SMALL.num_pairs  # every pair of the built-in task is valid and distinct: prepare keeps them all


class Pipeline:
    """`pipelines/ropo_full.py` in its own process group, its stdout collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path) -> None:
        self.lines: list[str] = []
        self.started = time.time()
        with open(stderr, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "ropo_full.py"), *args], env=env,
                                         cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                         start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def stages(self) -> list[str]:
        return [line[len("== stage: "):].strip() for line in list(self.lines) if line.startswith("== stage: ")]

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the pipeline ended (exit {self.proc.returncode}) before {what}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group: the driver and every child it started."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=30)
        with pytest.raises(ProcessLookupError):  # nothing of the group survived
            os.killpg(self.proc.pid, 0)


def parent_pid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def vllm_processes() -> list[int]:
    """PIDs of live processes of a vLLM engine (the Ray actor holding it, or the engine's core) of
    this test's Ray: descendants of this process, which started its raylet (other sessions on the
    machine may sample with vLLM too)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not (entry.name.isdigit() and re.search(rb"vLLM|VLLM|EngineCore", (entry / "cmdline").read_bytes())):
                continue
            ancestor = int(entry.name)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = parent_pid(ancestor)
            if ancestor == os.getpid():
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
    return pids


@dataclass
class Stage:
    """A pipeline stage: its `== stage:` line, its published marker (written last), what its log says
    when it does the work and when it finds its output published, and when to kill the driver in it
    (once a half-written output exists where there is one to make)."""

    line: str
    marker: Callable[[Path], Path | None]
    done: str
    skipped: str | None
    killable: Callable[[Pipeline, Path], bool]


def first(paths) -> Path | None:
    return next(iter(sorted(paths)), None)


def train_checkpointed(root: Path) -> bool:
    log = first((root / "run").glob("train-*_metrics.jsonl"))
    return log is not None and any(r.get("checkpoint") and r["step"] == 2 for r in read_metrics(log))


STAGES = [
    Stage("reference model", lambda r: r / "artifacts" / "demo-model" / "demo_model.json",
          r"demo model: \d+ SFT rows", "demo model: reusing",
          lambda p, r: re.search(r"demo model: \d+ SFT rows", p.out) is not None),  # building in a temp folder
    Stage("prepare pairs", lambda r: r / "run" / "data" / "manifest.json",
          f"prepare: kept {PAIRS} ", "prepare: up to date",
          lambda p, r: any(f.is_file() for f in (r / "run").glob(".data.tmp-*/**/*"))),  # Ray Data wrote some
    Stage("reference log-probs", lambda r: first((r / "cache").glob("*/manifest.json")),
          f"cache: 0 of {PAIRS} pairs reused, {PAIRS} computed", f"cache: {PAIRS} of {PAIRS} pairs reused, 0 computed",
          lambda p, r: any((r / "cache").glob(".*.tmp-*"))),  # the actor pool is scoring into a temp folder
    Stage("train main", lambda r: r / "run" / "model" / "run.json",
          "train: merged model and adapter weights in", r"train: train-\w+ already finished",
          lambda p, r: train_checkpointed(r)),  # step 2 of 4 checkpointed
    Stage("evaluate", lambda r: r / "run" / "report" / "manifest.json", "evaluate: report in", None,
          lambda p, r: bool(vllm_processes())),  # a vLLM engine is sampling
]


def pipeline_args(root: Path) -> list[str]:
    """The job-submit test's small built-in task (a shorter SFT), one worker, four steps, tiny evaluation,
    no baselines and no sweep."""
    task = {**{f: getattr(SMALL, f) for f in ("num_entities", "max_operand", "fact_repeats", "num_pairs",
                                              "num_heldout_prompts", "num_layers", "intermediate_size",
                                              "sft_batch_size")}, "num_sft_examples": 400, "sft_epochs": 2}
    return [*(f"task.{k}={v}" for k, v in task.items()), f"pipeline.run_dir={root}/run",
            f"pipeline.artifacts_dir={root}/artifacts", f"cache.root={root}/cache", "pipeline.compare_runs=[]",
            "tune.enabled=false", "train.num_workers=1", "train.max_steps=4", "train.eval_every=2",
            "train.log_every=1", "train.checkpoint_every=2", "train.micro_batch_size=8", "train.peak_flops=1e11",
            "eval.num_prompts=2", "eval.samples_per_prompt=1", "eval.max_tokens=8", "eval.probe_max_tokens=4"]


def test_driver_killed_in_each_stage_in_turn(ray_local, tmp_path):
    """A chain of runs of the pipeline: run k is SIGKILLed (its whole process group) inside stage k, at a
    point where that stage has a half-written output (a temp folder with files, a checkpoint mid-run, a
    vLLM engine sampling); run k+1 must skip stages < k (their markers untouched), do stage k again
    from what was published (never from the half-written output), and reach stage k+1; the last run
    finishes. Each run does about one stage's work, so the chain costs about one full run."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    args, published, timings = pipeline_args(tmp_path), {}, []
    for k in range(len(STAGES) + 1):
        run = Pipeline(args, env, tmp_path / "stderr.log")
        if k < len(STAGES):
            kill_in(run, STAGES[k], tmp_path)
        else:
            run.proc.wait(timeout=900)
            run.reader.join(timeout=30)
            tail = (tmp_path / "stderr.log").read_text(errors="replace")[-3000:]
            assert run.proc.returncode == 0, run.out[-3000:] + tail
        timings.append(round(time.time() - run.started))
        for i, earlier in enumerate(STAGES[:max(0, k - 1)]):  # published by an earlier run: skipped
            assert re.search(earlier.skipped, run.out) and not re.search(earlier.done, run.out), (k, earlier.line)
            assert stage_marker_mtime(earlier, tmp_path) == published[i], (k, earlier.line)
        if k >= 1:  # the stage the previous run was killed in: done again, now published
            redone = STAGES[k - 1]
            assert re.search(redone.done, run.out), (k, redone.line, run.out)
            published[k - 1] = stage_marker_mtime(redone, tmp_path)
    print(f"\nseconds per run (killed in {[s.line for s in STAGES]}, then to the end): {timings}")
    check_final_outputs(tmp_path)


def kill_in(run: Pipeline, stage: Stage, root: Path) -> None:
    """Kill `run` once it is in `stage` and the stage's half-written output exists; nothing is published."""
    run.wait_until(lambda: any(s.startswith(stage.line) for s in run.stages()), f"stage {stage.line!r}")
    run.wait_until(lambda: stage.killable(run, root), f"a half-written output of {stage.line!r}")
    assert run.stages()[-1].startswith(stage.line)  # still in that stage
    engines = vllm_processes()
    run.kill()
    marker = stage.marker(root)
    assert marker is None or not marker.exists(), f"{stage.line}: published although killed"
    assert not alive_after(engines, 60), "a vLLM engine process outlived the killed driver's job"


def stage_marker_mtime(stage: Stage, root: Path) -> int:
    marker = stage.marker(root)
    assert marker is not None and marker.is_file(), f"{stage.line}: no published marker"
    return marker.stat().st_mtime_ns


def alive_after(pids: list[int], seconds: float) -> list[int]:
    """Those of `pids` still running (zombies count as ended) after waiting up to `seconds` for Ray to
    end the dead job's actors. Orphans are found too: they are followed by PID, not by parent."""
    def running(pid: int) -> bool:
        try:
            return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + seconds
    while (left := [p for p in pids if running(p)]) and time.time() < deadline:
        time.sleep(0.5)
    return left


def check_final_outputs(root: Path) -> None:
    """What the last run trusted is whole: counted and checked here without the stages' own code."""
    data = root / "run" / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    rows = {s: pads.dataset(str(data / s), format="parquet").count_rows() for s in ("train", "eval")}
    assert rows["train"] + rows["eval"] == PAIRS == manifest["kept"]
    verify(STAGES[2].marker(root).parent)
    ray_run = first((root / "run" / "ray").glob("train-*"))
    checkpoints = [c for c in ray_run.glob("checkpoint_*") if c.is_dir()]
    assert checkpoints
    for checkpoint in checkpoints:  # every checkpoint kept, the one written before the kill included
        verify_checkpoint(checkpoint)
    records = read_metrics(first((root / "run").glob("train-*_metrics.jsonl")))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # resumed after step 2: none twice
    assert sum(r["step"] == 0 for r in records) == 1  # one fresh start
    assert len({r["pid"] for r in records if "pid" in r}) == 2  # steps 3-4 ran in the next run's worker
    report = json.loads((root / "run" / "report" / "report.json").read_text())
    assert [r["adapter"] for r in report["runs"]] == ["ropo"] and report["reference"]["metrics"]["samples"] == 2


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_altered_export_is_rebuilt_and_truncated_checkpoint_is_refused(polite_data, tiny_assets, tmp_path):
    """Design: an export whose bytes differ from run.json's record is not trusted; the run resumes from
    its final checkpoint, which exports it again (no step trained twice). A checkpoint Ray Train would
    resume from whose bytes differ from its integrity record is refused, before any worker starts, with
    an error naming the file (no silent fallback to an older checkpoint)."""
    root, base, cache_dir = polite_data
    common = [*base, "train.num_workers=1", "train.micro_batch_size=8", "train.checkpoint_every=2",
              "train.eval_every=2", "train.log_every=1"]

    datasets = training_datasets(load_config(None, common), cache_dir, root / "data")  # joined once for all

    def train(max_steps: int, logs: list[str]):
        cfg = load_config(None, [*common, f"train.max_steps={max_steps}"])
        return train_ray(cfg, Path(tiny_assets), Path(cache_dir), root / "data", tmp_path, name="faults",
                         log=logs.append, datasets=datasets)

    first = train(4, [])
    log_file = tmp_path / "faults_metrics.jsonl"
    trained = [r["step"] for r in read_metrics(log_file) if "loss" in r]
    assert trained == [1, 2, 3, 4]
    weights = tmp_path / "model" / "merged" / "model.safetensors"
    original = sha256(weights)

    # one byte of the exported weights flipped, size unchanged: the file vLLM would load, silently wrong
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    logs: list[str] = []
    again = train(4, logs)
    assert not isinstance(again, FinishedRun)  # not skipped as "already finished"
    assert any(str(weights) in line and "sha256 differs" in line for line in logs), logs
    assert sha256(weights) == original  # exported again from the final checkpoint, bit for bit
    records = read_metrics(log_file)
    assert [r["step"] for r in records if "loss" in r] == trained  # no step trained again
    assert again.metrics["step"] == 4
    assert again.metrics["eval/loss"] == pytest.approx(first.metrics["eval/loss"], abs=1e-6)

    # the checkpoint the run resumes from (the newest) loses its tail; asking for more steps must resume
    latest = Path(max((r["checkpoint"] for r in records if r.get("checkpoint")), key=lambda p: Path(p).name))
    state = latest / "engine" / "mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(state))) as refused:
        train(6, [])
    assert "truncated" in str(refused.value) and str(tmp_path / "ray" / "faults") in str(refused.value)
    assert read_metrics(log_file) == records  # refused before any worker ran
