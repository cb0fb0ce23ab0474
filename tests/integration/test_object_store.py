"""Object-store URIs for every storage path: the run folder (prepared data, checkpoints, export,
metrics, TensorBoard, report) and the reference cache live in an S3 bucket served by a local S3
server; nothing is written to a local run folder. Ray Data's tasks, Ray Train's workers and
controller, and the evaluation all reach the bucket through pyarrow's S3 filesystem."""

from __future__ import annotations

import json

import pytest

from ropo_ray.cli import main
from ropo_ray.config import load_config
from ropo_ray.storage import Store
from ropo_ray.train.ray_trainer import read_metrics, train_ray

pytestmark = pytest.mark.integration


def listing(root: Store) -> list[str]:
    return [f.path[len(root.path) + 1:] for f in root.files(recursive=True)]


def test_run_folder_and_cache_in_a_bucket(ray_local, polite_data, tiny_assets, s3_server, tmp_path, capsys):
    root, base, _ = polite_data
    run = Store(s3_server())
    cache = run.sibling("refcache")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} + 1?"}) + "\n" for i in range(4)))
    args = [*base, f"pipeline.run_dir={run.location}", f"cache.root={cache.location}", f"model.path={tiny_assets}",
            f"pipeline.artifacts_dir={tmp_path / 'artifacts'}", "train.num_workers=1", "train.micro_batch_size=8",
            "train.eval_every=2", "train.checkpoint_every=2"]

    assert main(["train", *args, "train.max_steps=2"]) == 0
    first = capsys.readouterr().out
    assert "cache: 0 of" in first  # a new cache root: every pair scored once, into the bucket
    files = listing(run)
    assert "data/manifest.json" in files and any(f.startswith("data/train/") and f.endswith(".parquet")
                                                 for f in files)
    assert {"model/run.json", "model/merged/model.safetensors", "model/adapter.safetensors",
            "model/config.yaml", "model/metrics.jsonl"} <= set(files)
    assert any(f.startswith("ray/train-") and "/checkpoint_" in f for f in files)  # Ray Train's checkpoints
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    cache_files = listing(cache)
    key = cache_files[0].split("/")[0]
    assert f"{key}/manifest.json" in cache_files
    manifest = cache.child(key, "manifest.json").read_json()
    assert manifest["rows"] == json.loads(run.child("data", "manifest.json").read_text())["kept"] == 200

    # the same command again: every stage finds its published output in the buckets and skips
    assert main(["train", *args, "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "prepare: up to date" in out and "0 computed with 0 reference forwards" in out
    assert "already finished" in out

    # the same run (same name) continued to 4 steps resumes from its checkpoint in the bucket
    (name,) = [f[: -len("_metrics.jsonl")] for f in listing(run) if f.endswith("_metrics.jsonl") and "/" not in f]
    cfg = load_config(None, [*args, "train.max_steps=4"])
    result = train_ray(cfg, tiny_assets, cache.child(key), run.child("data"), run, name=name, log=lambda s: None)
    history = read_metrics(run.child(f"{name}_metrics.jsonl"))
    assert [r["step"] for r in history if "loss" in r] == [2, 4], history  # step 2 once, never again
    assert sum(1 for r in history if r["step"] == 0) == 1  # no fresh start
    assert result.metrics["step"] == 4 and run.child("model", "run.json").read_json()["metrics"]["step"] == 4

    # evaluation reads the export from the bucket (a local mirror for vLLM) and writes the report there
    assert main(["evaluate", *args, "train.max_steps=4", f"eval.prompts_file={prompts}", "eval.num_prompts=4",
                 "eval.samples_per_prompt=2", "eval.max_tokens=8", "eval.probe_max_tokens=4"]) == 0
    report = run.child("report", "report.json").read_json()
    assert [r["name"] for r in report["runs"]] == ["ropo-dpo"] and report["reference"]["metrics"]["samples"] == 8
    assert run.child("report", "report.html").read_text().startswith("<!DOCTYPE html>")
    assert run.child("report", "manifest.json").is_file() and run.child("report", "samples.jsonl").size() > 0
    assert len(run.child("report", "samples.jsonl").read_text().splitlines()) == 16  # 8 policy + 8 reference
    assert not (tmp_path / "runs").exists()
