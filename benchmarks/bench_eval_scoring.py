"""An evaluation's scoring (log-probs under each run's policy and the reference: KL, preference accuracy,
knowledge NLL) as `ropo_ray.eval.evaluate` does it, timed whole per side:

    python benchmarks/bench_eval_scoring.py [--repeats 3] [--runs 3] [--out benchmarks/results/eval_scoring.json]

Sides:
- one_pass: the product (session 24): one Ray Data pass for every run; its actor keeps the reference loaded and
  scores each distinct (prompt, completion) under it once, each run's policy loading as its rows arrive;
- per_run: what evaluation did before: a pass per run (`score_logps` on that run's rows alone), each pass
  starting its actor and loading the reference and the run's policy.

The models are those of bench_eval_engine (the embedded default's model as the reference and `--runs` copies
with noise as the runs, in benchmarks/artifacts), sampled once on shared engines as the evaluation does; the
held-out pairs come from preparing the task's pairs with the demo config. Sides alternate which goes first,
each after the machine is quiet; the log-probs of the sides are compared row by row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import benchlib
import ray
from bench_eval_engine import DEMO, noisy_copies

from ropo_ray.config import load_config
from ropo_ray.data.prepare import prepare
from ropo_ray.eval.evaluate import eval_inputs, held_out_pairs, sample_model, scoring_rows, user_prompt_ids
from ropo_ray.eval.sampling import SamplingEngines
from ropo_ray.eval.scoring import score_logps
from ropo_ray.runs import resolve_model, start_local_ray, tokenizer_dir
from ropo_ray.train.model_io import load_tokenizer


def drive(args: argparse.Namespace) -> dict:
    artifacts = Path(__file__).resolve().parent / "artifacts"
    cfg = load_config(DEMO, [f"pipeline.artifacts_dir={artifacts}"])
    reference = resolve_model(cfg)
    runs = {f"run-{k}": folder for k, folder in
            enumerate(noisy_copies(reference, artifacts / "eval-engine-models", args.runs), start=1)}
    tok_dir = tokenizer_dir(cfg, reference)
    tokenizer = load_tokenizer(tok_dir, cfg.model)
    prompts, probes = eval_inputs(cfg, reference)
    prompt_ids, probe_ids = user_prompt_ids(tokenizer, prompts), user_prompt_ids(tokenizer, probes)
    start_local_ray(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    prepare(cfg, str(tok_dir), args.work / "data", (str(reference / "task" / "pairs.jsonl"),), log=lambda s: None)
    pairs = held_out_pairs(args.work / "data")
    with SamplingEngines(cfg.eval) as engines:
        samples = {name: sample_model(folder, prompt_ids, probe_ids, cfg, engines)["samples"]
                   for name, folder in runs.items()}
    rows = {name: [{**row, "run": name} for row in scoring_rows(samples[name], prompt_ids, probes, probe_ids,
                                                                  pairs, tokenizer)] for name in runs}
    batch = cfg.eval.score_batch_size
    sides = {"one_pass": lambda: score_logps([r for name in runs for r in rows[name]], reference, runs, cfg.model,
                                             batch),
             "per_run": lambda: [r for name in runs
                                 for r in score_logps(rows[name], reference, {name: runs[name]}, cfg.model, batch)]}
    order = list(sides)
    seconds: dict[str, list[float]] = {s: [] for s in order}
    largest_difference, waited = [], []
    for r in range(args.repeats):
        out = {}
        for side in order[r % 2:] + order[:r % 2]:
            waited.append(benchlib.wait_for_quiet(args))
            t0 = time.perf_counter()
            out[side] = sides[side]()
            seconds[side].append(time.perf_counter() - t0)
            print(f"repeat {r}, {side}: {seconds[side][-1]:.1f} s", flush=True)
        largest_difference.append(max(abs(a[f"{m}_logp"] - b[f"{m}_logp"]) for a, b in zip(*out.values())
                                      for m in ("policy", "reference")))
    ray.shutdown()
    medians = {s: statistics.median(v) for s, v in seconds.items()}
    return {"machine": benchlib.machine(), "versions": benchlib.versions("ray", "torch"),
            "command": " ".join(["python", "benchmarks/bench_eval_scoring.py", *sys.argv[1:]]),
            "runs": len(runs), "rows_per_run": {name: len(r) for name, r in rows.items()},
            "held_out_pairs": len(pairs), "probes": len(probes), "seconds": seconds, "median_s": medians,
            "per_run_over_one_pass": medians["per_run"] / medians["one_pass"],
            "largest_logp_difference_per_repeat": largest_difference, "waited_for_quiet_s": waited}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="noisy copies of the reference scored as runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_scoring.json")
    benchlib.add_ray_bench_arguments(parser)
    return parser.parse_args()


if __name__ == "__main__":
    benchlib.main(parse(), lambda args: None, drive, "bench-eval-scoring-")
