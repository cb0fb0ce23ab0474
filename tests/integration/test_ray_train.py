"""Ray Train + DeepSpeed workers: loss from ln 2 down, ZeRO-2 and ZeRO-3, export, resume, worker loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ropo_ray.config import load_config
from ropo_ray.data.prepare import prepare
from ropo_ray.refcache.stage import build_cache
from ropo_ray.runs import joined_rows
from ropo_ray.train.model_io import load_model, load_tokenizer
from ropo_ray.train.ray_trainer import read_metrics, train_ray
from ropo_ray.train.step import evaluate_pairs


@pytest.fixture(scope="module")
def data(ray_local, tiny_assets, tmp_path_factory):
    """Pairs sharing one learnable preference (polite beats rude), prepared and cached once."""
    root = tmp_path_factory.mktemp("train-data")
    rows = [{"prompt": f"Question {i}: what is {i} + {i % 7}?", "chosen": "Thank you, happy to help.",
             "rejected": "No. Go away."} for i in range(200)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = [f"cache.root={root}/cache", f"data.train_files=[{root}/pairs.jsonl]", "data.eval_fraction=0.2"]
    cfg = load_config(None, base)
    prepare(cfg, str(tiny_assets), root / "data", cfg.data.train_files)
    cache = build_cache(cfg, tiny_assets, tiny_assets, root / "data", log=lambda s: None)
    return root, base, cache["cache_dir"]


def run(data, tiny_assets, run_dir, overrides, name="train"):
    root, base, cache_dir = data
    cfg = load_config(None, [*base, "train.lr=0.03", "loss.beta=0.5", "train.epochs=2", "train.eval_every=5",
                             "train.log_every=1", *overrides])
    return cfg, train_ray(cfg, Path(tiny_assets), Path(cache_dir), root / "data", run_dir, name=name,
                          log=lambda s: None)


def history(run_dir, name="train"):
    return read_metrics(run_dir / f"{name}_metrics.jsonl")


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_starts_at_ln2_falls_and_export_matches(data, tiny_assets, tmp_path, stage):
    cfg, result = run(data, tiny_assets, tmp_path, [f"train.zero_stage={stage}", "train.num_workers=2",
                                                     "train.micro_batch_size=8"])
    records = history(tmp_path)
    first_eval = next(r for r in records if r["step"] == 0)
    assert abs(first_eval["eval/loss"] - math.log(2)) <= 1e-5
    assert result.metrics["eval/loss"] < math.log(2) - 0.1
    assert result.metrics["eval/rewards/accuracies"] >= 0.9
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
    merged = load_model(tmp_path / "model" / "merged", cfg.model)
    # the exported weights reproduce the trained policy's held-out loss
    rows = joined_rows(load_config(None, [f"pipeline.run_dir={data[0]}"]), data[2], "eval")
    again = evaluate_pairs(merged, rows, load_tokenizer(tiny_assets, cfg.model).pad_token_id, cfg.loss)
    assert abs(again["eval/loss"] - result.metrics["eval/loss"]) < 1e-4
