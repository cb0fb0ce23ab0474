"""An N-trial sweep with the shared reference cache versus the same sweep scoring the reference in every trial.

    python benchmarks/bench_sweep.py [--trials 4 8] [--steps 20] [--out benchmarks/results/sweep.json]

Both sides run the same trials (random search, fixed seed, no early stopping, so both train exactly
the same configurations for the same steps) on the built-in task with its SFT model, 1 worker x 1 CPU
per trial, trials two at a time on this 2-core machine.

- shared cache (ropo-ray): the cache stage scores every pair once (a cold cache, its time included),
  then every trial reads it.
- per-trial reference: each trial's driver first scores every pair with the reference model itself
  (the same length-sorted `reference_logps` the cache stores, single-threaded in the trial), as a sweep
  without a shared cache must; it then trains exactly like the other side (on the shared cache's
  numbers, which are the same numbers).

Reported per N: wall time of each side (cache stage + sweep for the shared side), their ratio, and the
reference forwards (batches through the reference model) each side performed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib

from ropo_ray.config import load_config
from ropo_ray.runs import connect_ray, resolve_model, run_cache, run_prepare
from ropo_ray.tune.sweep import _trial, run_sweep, trial_key

REF_BATCH = 32


def trial_with_own_reference(values: dict[str, Any], base: Any, model_dir: str, cache_dir: str, prepared: str,
                             runs_dir: str, datasets: dict[str, Any], steps: int) -> None:
    """A trial that scores the reference over every prepared pair before training (no shared cache)."""
    import pyarrow.dataset as pads
    import torch

    from ropo_ray.refcache.compute import reference_logps
    from ropo_ray.train.model_io import load_model, load_tokenizer

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_model(model_dir, base.model)
    pad_id = load_tokenizer(model_dir, base.model).pad_token_id
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    rows = [r for split in ("train", "eval")
            for r in pads.dataset(str(Path(prepared) / split), format="parquet").to_table(columns=columns).to_pylist()]
    reference_logps(model, rows, pad_id, batch_size=REF_BATCH)
    folder = Path(runs_dir) / trial_key(values)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reference.json").write_text(json.dumps(
        {"forwards": math.ceil(len(rows) / REF_BATCH), "pairs": len(rows), "seconds": time.perf_counter() - t0}))
    del model
    _trial(values, base, model_dir, cache_dir, prepared, runs_dir, datasets, steps)


def one_side(work: Path, trials: int, steps: int, per_trial: bool) -> dict[str, Any]:
    tag = f"{'per-trial' if per_trial else 'shared'}-{trials}"
    cfg = load_config(None, [
        f"pipeline.run_dir={work}/{tag}", f"cache.root={work}/cache-{tag}", "train.num_workers=1",
        "train.micro_batch_size=16", f"train.max_steps={steps}", f"train.eval_every={steps // 2}",
        "tune.search=random", f"tune.num_samples={trials}", "tune.scheduler=none", "tune.seed=0"])
    model_dir = resolve_model(cfg, log=lambda s: None)
    run_prepare(cfg, model_dir, log=lambda s: None)
    if per_trial:  # the trials still train on the joined data: a cache built outside this side's timing
        cache = run_cache(cfg, model_dir, log=lambda s: None)
    t0 = time.perf_counter()
    if not per_trial:  # ropo-ray: the cold cache build is part of the sweep's cost
        cache = run_cache(cfg, model_dir, log=lambda s: None)
    summary = run_sweep(cfg, model_dir, cache, Path(cfg.pipeline.run_dir) / "data", log=lambda s: None,
                        trial=trial_with_own_reference if per_trial else _trial)
    seconds = time.perf_counter() - t0
    runs = Path(summary["folder"]) / "runs"
    per = [json.loads(p.read_text()) for p in runs.glob("*/reference.json")]
    forwards = sum(p["forwards"] for p in per) if per_trial else cache["reference_forwards"]
    return {"seconds": seconds, "reference_forwards": forwards, "trials": summary["trials"],
            "completed": summary["completed"], "cache_pairs": cache["pairs"],
            "reference_seconds_in_trials": sum(p["seconds"] for p in per)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    connect_ray(log=lambda s: None)
    results: dict[str, Any] = {}
    for n in args.trials:
        shared = one_side(work, n, args.steps, per_trial=False)
        per_trial = one_side(work, n, args.steps, per_trial=True)
        results[str(n)] = {"shared cache": shared, "per-trial reference": per_trial,
                           "speedup": per_trial["seconds"] / shared["seconds"]}
        print(json.dumps({n: results[str(n)]}, indent=2), flush=True)
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": benchlib.machine(load_at_end=Path("/proc/loadavg").read_text().split()[:3]),
        "steps_per_trial": args.steps, "results": results,
        "note": "shared side's seconds include building the cache cold; per-trial side's cache (needed only to "
                "feed the identical training) is built outside its timing",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
