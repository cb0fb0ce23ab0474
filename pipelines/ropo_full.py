"""The ropo-ray pipeline, top to bottom as the data flow of DESIGN.md.

    python pipelines/ropo_full.py [--config YAML] [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/ropo_full.py

With no arguments it runs the embedded default (pipelines/configs/demo.yaml): the built-in task's
tiny model is built here (no download); Ray Data prepares its preference pairs and computes the
reference log-probs once into the shared cache; with tune.enabled=true a Ray Tune sweep over beta,
block sizes and learning rate picks the configuration (every trial reading the same cache); Ray
Train's DeepSpeed workers train RoPO with it, and the baselines of `pipeline.compare_runs` (DPO with
full weights and with LoRA in the demo) from the same reference and cache; vLLM samples every policy
and the reference through Ray Data, and the report (report.json + a self-contained report.html)
compares them. Every stage skips when its published output matches, so a rerun after a crash
continues from the first unfinished stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ropo_ray.config import load_config
from ropo_ray.eval.evaluate import evaluate
from ropo_ray.runs import (
    StageTimer,
    compare_configs,
    connect_ray,
    prepared_dir,
    report_dir,
    resolve_model,
    run_cache,
    run_prepare,
    run_store,
    set_threads,
    tokenizer_dir,
    train_run_name,
)
from ropo_ray.train.ray_trainer import SharedDatasets, train_ray

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    set_threads()
    stage = StageTimer()
    run_dir = run_store(cfg)  # a local folder or an object-store URI

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

    exports, finals = [], {}
    datasets = SharedDatasets(cfg, cache["cache_dir"], prepared_dir(cfg))  # one join for every run below
    for label, run_cfg, folder in [("main", cfg, run_dir), *compare_configs(cfg, run_dir)]:
        with stage(f"train {label}: {run_cfg.adapter.type}, {run_cfg.loss.type} (Ray Train + DeepSpeed)"):
            result = train_ray(run_cfg, model_dir, cache["cache_dir"], prepared_dir(cfg), folder,
                               name=train_run_name(run_cfg, cache["key"]), datasets=datasets)
        exports.append(folder.child("model"))
        finals[label] = {k: result.metrics.get(k) for k in ("eval/loss", "eval/rewards/accuracies", "step")}

    with stage("evaluate (vLLM samples of the reference and every run; report)"):
        report = evaluate(cfg, model_dir, tokenizer_dir(cfg, model_dir), exports, prepared_dir(cfg), report_dir(cfg))
    print(json.dumps({"final held-out metrics": finals, "stage_seconds": stage.seconds}, indent=2, default=str))
    print(f"merged models: {', '.join(str(e.child('merged')) for e in exports)}")
    print(f"report: {report['paths']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
