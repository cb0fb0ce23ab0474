"""The ropo-ray pipeline, top to bottom as the data flow of DESIGN.md.

    python pipelines/ropo_full.py [--config YAML] [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/ropo_full.py

With no arguments it runs the embedded default (pipelines/configs/demo.yaml): the built-in task's
tiny model is built here (no download); Ray Data prepares its preference pairs and computes the
reference log-probs once into the shared cache; RoPO trains on them (one process in this version:
Ray Train workers, Tune and the vLLM evaluation are the next stages), and the merged policy is exported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ropo_ray.config import load_config
from ropo_ray.runs import (
    StageTimer,
    connect_ray,
    export_run,
    joined_rows,
    resolve_model,
    run_cache,
    run_prepare,
    set_threads,
)
from ropo_ray.train.local import train_local
from ropo_ray.train.model_io import load_model, load_tokenizer

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
        train_rows, eval_rows = (joined_rows(cfg, cache["cache_dir"], split) for split in ("train", "eval"))
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or model_dir, cfg.model)
    model = load_model(model_dir, cfg.model)
    with stage(f"train ({cfg.adapter.type}, {cfg.loss.type})"):
        result = train_local(model, train_rows, eval_rows, tokenizer.pad_token_id, cfg)
    with stage("export"):
        out = export_run(result.model, tokenizer, cfg, Path(cfg.pipeline.run_dir) / "model", result.summary)

    s = result.summary
    print(json.dumps({**s, "stage_seconds": stage.seconds}, indent=2))
    print(f"held-out DPO loss {s['start_eval_loss']:.4f} (ln 2 = {math.log(2):.4f}) -> {s['final_eval_loss']:.4f}; "
          f"held-out preference accuracy {s['start_eval_accuracy']:.3f} -> {s['final_eval_accuracy']:.3f}")
    print(f"merged model and adapter weights: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
