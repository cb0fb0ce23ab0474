"""Ray Tune sweeps over the shared cache: no deadlock on 2 CPUs, ASHA stops a weak trial, no reference
forward, the best config trains with `ropo-ray train`, and a killed sweep resumes without redoing trials."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ropo_ray.cli import main
from ropo_ray.config import load_config
from ropo_ray.train.ray_trainer import read_metrics


def sweep_args(polite_data, tiny_assets, extra):
    root, base, _ = polite_data
    return [*base, f"model.path={tiny_assets}", "train.num_workers=1", "train.micro_batch_size=8",
            "train.eval_every=2", "train.epochs=1", *extra]


def sweep_folder(root: Path) -> Path:
    folders = [p for p in (root / "sweep").iterdir() if p.name.startswith("sweep-")]
    return max(folders, key=lambda p: p.stat().st_mtime)


def trial_records(folder: Path) -> dict[str, list[dict]]:
    return {run.name: read_metrics(run / "train_metrics.jsonl") for run in (folder / "runs").iterdir()}


def test_sweep_asha_no_reference_forward_and_best_trains(polite_data, tiny_assets, tmp_path, capsys):
    """Four trials (a grid over lr and block sizes; beta fixed) on 2 CPUs, two at a time. The grid creates
    its trials in order as slots free up, so the two lr=0.03 trials run first; ASHA (rungs at steps 2
    and 4, keep the better half) may stop the weaker of them. The tiny learning rate cannot move the
    loss off ln 2, so both lr=1e-7 trials arrive at step 2 behind the recorded ones and are stopped."""
    root = polite_data[0]
    args = sweep_args(polite_data, tiny_assets, [
        f"pipeline.run_dir={tmp_path}", "train.max_steps=8", "tune.search=grid", "tune.lr_values=[0.03,1e-7]",
        "tune.beta_values=[0.5]", "tune.block_size_choices=[[2],[2,4]]", "tune.grace_period=2",
        "tune.reduction_factor=2", "tune.num_samples=1", "train.probe_prompts=4", "train.probe_max_tokens=8",
        "tune.kl_penalty=0.01", "tune.length_penalty=0.1"])
    # the prepared data and cache of the fixture are reused: point this sweep's run at the same data
    (tmp_path / "data").symlink_to(root / "data")
    assert main(["sweep", *args]) == 0
    out = capsys.readouterr().out
    summary = yaml.safe_load(out[out.index("sweep:\n"):])["sweep"]
    assert summary["trials"] == 4 and summary["error"] == 0
    assert summary["reference_forwards"] == 0  # the cache was complete: the whole sweep did no reference forward
    with open(summary["results_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and pq.read_table(summary["results_parquet"]).num_rows == 4
    weak = [r for r in rows if float(r["train.lr"]) == 1e-7]
    assert len(weak) == 2 and all(r["status"] == "stopped early" and int(r["step"]) < 8 for r in weak), rows
    assert summary["stopped early"] >= 2
    for r in rows:  # the objective ASHA and the choice of the best used: loss + 0.01 KL + 0.1 length growth
        kl, ratio = float(r["eval/probe/kl"]), float(r["eval/probe/length_ratio"])
        assert float(r["eval/objective"]) == pytest.approx(
            float(r["eval/loss"]) + 0.01 * kl + 0.1 * max(0.0, ratio - 1.0), abs=1e-6)
        if float(r["train.lr"]) == 1e-7:  # a policy that barely moved: its KL to the reference is ~0
            assert abs(kl) < 1e-2 and abs(ratio - 1.0) < 0.2
    best = min((r for r in rows if r["status"] == "completed"), key=lambda r: float(r["eval/objective"]))
    assert float(best["train.lr"]) == 0.03 and float(best["eval/loss"]) < 0.6
    assert summary["best_trial"] == best["trial_id"]
    # every trial has its own TensorBoard folder and metrics
    for run, records in trial_records(Path(summary["folder"])).items():
        assert records and (Path(summary["folder"]) / "runs" / run / "tensorboard").is_dir()
    # the best config is a complete config `ropo-ray train` takes unchanged, and it trains to the same loss
    best_cfg = load_config(summary["best_yaml"])
    assert best_cfg.train.lr == 0.03 and best_cfg.adapter.block_sizes == tuple(
        int(b) for b in best["adapter.block_sizes"].split(","))
    assert main(["train", "--config", summary["best_yaml"]]) == 0
    out = capsys.readouterr().out
    final = yaml.safe_load(out[out.index("final_metrics:"):])["final_metrics"]
    assert final["step"] == 8
    assert abs(final["eval/loss"] - float(best["eval/loss"])) < 1e-4  # same config, same seed, same run


def test_killed_sweep_resumes_without_rerunning_finished_trials(polite_data, tiny_assets, tmp_path, ray_local):
    """SIGKILL the sweep's driver process after its first trial finished; running the same sweep again
    restores it (Tuner.restore): the finished trial is not trained again and the others complete. The
    grid runs twice (num_samples=2): the repeats are reported from the first runs, not retrained."""
    root = polite_data[0]
    (tmp_path / "data").symlink_to(root / "data")
    args = sweep_args(polite_data, tiny_assets, [
        f"pipeline.run_dir={tmp_path}", "train.max_steps=6", "tune.search=grid", "tune.lr_values=[0.03]",
        "tune.beta_values=[0.2,0.5,1.0]", "tune.block_size_choices=[[2]]", "tune.scheduler=none",
        "tune.max_concurrent_trials=1", "tune.num_samples=2"])
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "ropo_ray.cli", "sweep", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finished: list[str] = []
    deadline = time.time() + 900
    while time.time() < deadline and not finished and proc.poll() is None:
        time.sleep(1)
        if (tmp_path / "sweep").is_dir() and any((tmp_path / "sweep").iterdir()):
            runs = trial_records(sweep_folder(tmp_path)) if (sweep_folder(tmp_path) / "runs").is_dir() else {}
            finished = [t for t, recs in runs.items() if any(r["step"] == 6 and r.get("checkpoint") for r in recs)]
    assert finished and proc.poll() is None, "the sweep ended before a trial finished"
    time.sleep(5)  # let Tune save its experiment state with the finished trial in it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = trial_records(sweep_folder(tmp_path))
    assert len(before) < 3  # killed mid-way: not every trial had started
    assert main(["sweep", *args]) == 0
    folder = sweep_folder(tmp_path)
    after = trial_records(folder)
    assert len(after) == 3
    for run in finished:
        assert after[run] == before[run]  # a finished trial was not run again
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["completed"] * 3
    assert sorted(r["loss.beta"] for r in rows) == [0.2, 0.5, 1.0]


def test_crashing_trial_is_reported_and_the_sweep_continues(polite_data, tiny_assets, tmp_path, capsys):
    """One trial of a two-trial grid asks for a rotation block (128) larger than the tiny model's layers
    (hidden size 64): its workers raise while building the model, for real. The sweep still finishes:
    the other trial completes, the summary, the log and the results table name the failed trial with
    the error, and the best configuration is the trial that finished."""
    root = polite_data[0]
    (tmp_path / "data").symlink_to(root / "data")
    args = sweep_args(polite_data, tiny_assets, [
        f"pipeline.run_dir={tmp_path}", "train.max_steps=4", "tune.search=grid", "tune.lr_values=[0.03]",
        "tune.beta_values=[0.5]", "tune.block_size_choices=[[2],[128]]", "tune.scheduler=none",
        "train.max_failures=0"])
    assert main(["sweep", *args]) == 0
    out = capsys.readouterr().out
    summary = yaml.safe_load(out[out.index("sweep:\n"):])["sweep"]
    assert (summary["trials"], summary["completed"], summary["error"]) == (2, 1, 1)
    expected = "block size 128 is larger than the layer's input dimension 64"  # hidden_size of tiny_assets
    (failed,) = summary["failed"]
    assert failed["values"]["adapter.block_sizes"] == "128" and expected in failed["error"], failed
    assert any(failed["trial_id"] in line and expected in line for line in out.splitlines()), out
    rows = {r["adapter.block_sizes"]: r for r in pq.read_table(summary["results_parquet"]).to_pylist()}
    assert rows["128"]["status"] == "error" and expected in rows["128"]["error"]
    assert rows["2"]["status"] == "completed" and rows["2"]["step"] == 4 and rows["2"]["error"] is None
    assert summary["best_trial"] == rows["2"]["trial_id"] and summary["best_values"]["adapter.block_sizes"] == "2"
    assert load_config(summary["best_yaml"]).adapter.block_sizes == (2,)
    records = trial_records(Path(summary["folder"]))[rows["2"]["run"]]
    assert max(r["step"] for r in records) == 4
