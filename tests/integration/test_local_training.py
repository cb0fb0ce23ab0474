"""RoPO trains on prepared + cached pairs: the held-out DPO loss starts at ln 2 and falls, accuracy rises."""

from __future__ import annotations

import math

from ropo_ray.config import load_config
from ropo_ray.runs import export_run, joined_rows
from ropo_ray.train.local import train_local
from ropo_ray.train.model_io import load_model, load_tokenizer
from ropo_ray.train.step import evaluate_pairs


def test_loss_starts_at_ln2_and_falls(polite_data, tiny_assets, tmp_path):
    _, base, cache_dir = polite_data
    cfg = load_config(None, [*base, "train.micro_batch_size=16", "train.eval_every=10"])
    train, evals = joined_rows(cfg, cache_dir, "train"), joined_rows(cfg, cache_dir, "eval")
    tokenizer = load_tokenizer(tiny_assets, cfg.model)
    result = train_local(load_model(tiny_assets, cfg.model), train, evals, tokenizer.pad_token_id, cfg,
                         log=lambda s: None)
    s = result.summary
    assert abs(s["start_eval_loss"] - math.log(2)) <= 1e-5  # policy == reference at step 0
    assert s["final_eval_loss"] < math.log(2) - 0.1
    assert s["final_eval_accuracy"] >= 0.9 > s["start_eval_accuracy"]
    assert max(h.get("orthogonality_error", 0.0) for h in result.history) < 1e-5

    out = export_run(result.model, tokenizer, cfg, tmp_path / "export", s)
    assert (out / "merged" / "config.json").is_file() and (out / "adapter.safetensors").is_file()
    merged = load_model(out / "merged", cfg.model)
    again = evaluate_pairs(merged, evals, tokenizer.pad_token_id, cfg.loss)
    assert abs(again["eval/loss"] - s["final_eval_loss"]) < 1e-4  # the exported weights are the trained policy
