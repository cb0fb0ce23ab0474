"""The ropo-ray pipeline, top to bottom as the data flow of DESIGN.md.

    python pipelines/ropo_full.py [--config YAML] [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/ropo_full.py

With no arguments it runs the embedded default (pipelines/configs/demo.yaml): the built-in task's
tiny model is built here (no download); Ray Data prepares its preference pairs and computes the
reference log-probs once into the shared cache; with tune.enabled=true a Ray Tune sweep over beta,
block sizes and learning rate picks the configuration (every trial reading the same cache); Ray
Train's DeepSpeed workers train RoPO with it and export the merged policy; vLLM samples the policy and
the reference through Ray Data and the report (report.json + a self-contained report.html) compares them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ropo_ray.config import load_config
from ropo_ray.eval.evaluate import evaluate
from ropo_ray.runs import (
    StageTimer,
    connect_ray,
    prepared_dir,
    resolve_model,
    run_cache,
    run_prepare,
    set_threads,
    tokenizer_dir,
    train_run_name,
)
from ropo_ray.train.ray_trainer import read_metrics, train_ray

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    set_threads()
    stage = StageTimer()

    with stage("reference model"):
        model_dir = resolve_model(cfg)
    connect_ray()
    with stage("prepare pairs (Ray Data)"):
        run_prepare(cfg, model_dir)
    with stage("reference log-probs (Ray Data actor pool, cached)"):
        cache = run_cache(cfg, model_dir)
    if cfg.tune.enabled:
        from ropo_ray.tune.space import trial_overrides
        from ropo_ray.tune.sweep import best_config, run_sweep

        with stage("sweep (Ray Tune over Ray Train trials, shared cache)"):
            sweep = run_sweep(cfg, model_dir, cache, prepared_dir(cfg))
        cfg = best_config(cfg, sweep["best_values"])
        print(f"training the sweep's best configuration: {trial_overrides(sweep['best_values'])}")
    with stage(f"train ({cfg.adapter.type}, {cfg.loss.type}; Ray Train + DeepSpeed)"):
        name = train_run_name(cfg, cache["key"])
        result = train_ray(cfg, model_dir, Path(cache["cache_dir"]), prepared_dir(cfg), Path(cfg.pipeline.run_dir),
                           name=name)
    history = read_metrics(Path(cfg.pipeline.run_dir) / f"{name}_metrics.jsonl")
    start = next(h for h in history if h["step"] == 0)
    final = result.metrics
    print(json.dumps({"final": final, "stage_seconds": stage.seconds}, indent=2, default=str))
    print(f"held-out DPO loss {start['eval/loss']:.4f} (ln 2 = {math.log(2):.4f}) -> {final['eval/loss']:.4f}; "
          f"held-out preference accuracy {start['eval/rewards/accuracies']:.3f} -> "
          f"{final['eval/rewards/accuracies']:.3f}")
    print(f"merged model and adapter weights: {Path(cfg.pipeline.run_dir) / 'model'}")
    with stage("evaluate (vLLM samples through Ray Data; report)"):
        report = evaluate(cfg, model_dir, tokenizer_dir(cfg, model_dir), [Path(cfg.pipeline.run_dir) / "model"],
                          prepared_dir(cfg), Path(cfg.eval.report_dir or Path(cfg.pipeline.run_dir) / "report"))
    print(f"report: {report['paths']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
