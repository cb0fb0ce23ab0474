"""Where a RoPO training step's time goes, and how the step scales with sequence length and batch.

    python benchmarks/bench_step.py        # -> results/step.json

Uses bench_train.py's model (49M-parameter Llama), data and sides, each in its own process:

- profile: one `ropo_fp32` and one `ropo_bf16` run at the default point (8 pairs of <= 81 tokens) whose timed
  steps run under torch.profiler; self time grouped (bench_train.PROFILE_GROUPS) into the rotation kernel,
  attention, matmuls, dtype conversions, the rotation's parameter side (Cayley eliminations, band coefficients), the
  optimizer and the rest, plus the wall-clock phases (data collation, forward, backward, optimizer step);
- overhead: the RoPO layers' overhead over the frozen model in one process, fp32 and bf16 (bench_train's
  `ropo_overhead_*` sides: the same adapted model stepping with its RoPO layers on and off in alternation,
  --rounds pairs; the issue's "RoPO layer overhead over the frozen base forward + backward");
- layer: one RoPO layer alone (1,296 tokens, as in a step of 8 pairs of 81 tokens), forward + backward, in
  five forms side by side: the frozen `nn.Linear`, RoPO with the torch block matmuls, RoPO with the kernel
  inside autograd's composed ops, the fused layer (adapters/fused.py) with every factor as a band, and the
  fused layer as training runs it on the CPU (factors in the kernel's lane form where the vector length allows)
  (medians of 30 calls each, interleaved);
- scaling: `ropo_fp32` and `base` (frozen model, forward + backward) at sequence lengths 41 / 81 / 161
  (batch 8) and batches 4 / 8 / 16 (length 81), one run each, sides back to back per point, so the RoPO
  overhead at each point compares like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bench_train
import benchlib

POINTS = [(41, 8), (81, 8), (161, 8), (81, 4), (81, 16)]  # (sequence length, pairs per step)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step.json"))
    parser.add_argument("--rounds", type=int, default=20, help="RoPO / frozen step pairs of the overhead part")
    parser.add_argument("--parts", default="overhead,layer,profile,scaling",
                        help="which parts to run, e.g. layer (the others take minutes per point)")
    parser.add_argument("--profile-precisions", default="fp32,bf16",
                        help="fp32 alone on a CPU without native bf16, where a bf16 step takes minutes")
    benchlib.add_quiet_arguments(parser, max_other_cores=0.2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    return parser.parse_args()


def point_args(args: argparse.Namespace, work: Path, seq_len: int, batch: int) -> argparse.Namespace:
    """bench_train's arguments for one point, with its own work folder (model, rows)."""
    base = bench_train.parse_args([])
    for key, value in vars(args).items():
        setattr(base, key, value)
    base.seq_len, base.batch, base.work = seq_len, batch, work
    return base


def layer_times(tokens: int = 1296, calls: int = 30) -> list[dict]:
    """Median ms of forward + backward for one layer in each form (module docstring)."""
    import statistics

    import torch
    from torch import nn

    from ropo_ray.adapters.ropo_linear import RoPOLinear
    from ropo_ray.adapters.rotation import kernel_layouts

    torch.set_num_threads(2)
    out = []
    for d, n in ((640, 640), (640, 1664), (1664, 640)):
        torch.manual_seed(0)
        base = nn.Linear(d, n, bias=False).requires_grad_(False)
        x = torch.randn(tokens, d, requires_grad=True)
        composed = RoPOLinear(base, kernel="native")
        composed.fuse = False  # the kernel inside autograd's composed ops (scale and its gradient apart)
        banded = RoPOLinear(base, kernel="native")
        banded._bands = kernel_layouts(d, banded.block_sizes, banded.mixing, 0)  # every factor a band
        forms = {"frozen linear": base, "RoPO, torch block matmuls": RoPOLinear(base, kernel="torch"),
                 "RoPO, kernel, composed ops": composed, "RoPO, fused layer, band form": banded,
                 "RoPO, fused layer, lane form": RoPOLinear(base, kernel="native")}
        times: dict[str, list[float]] = {k: [] for k in forms}
        for i in range(calls + 3):
            for name, layer in forms.items():
                t = time.perf_counter()
                layer(x).sum().backward()
                if i >= 3:
                    times[name].append(time.perf_counter() - t)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        out.append({"in": d, "out": n, "tokens": tokens, "median_ms": med,
                    "overhead_vs_frozen": {k: v / med["frozen linear"] - 1 for k, v in med.items()
                                           if k != "frozen linear"}})
        print(json.dumps(out[-1]), flush=True)
    return out


def drive(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    bench_train.wait_for_quiet(args)
    parts = set(args.parts.split(","))
    layers = layer_times() if "layer" in parts else []
    points = []
    profiles: dict[str, dict] = {}
    overhead: dict[str, dict] = {}
    # the profile and the overhead run at the default point (81 x 8), which the scaling points include
    default_only = [(81, 8)] if {"profile", "overhead"} & parts else []
    for seq_len, batch in POINTS if "scaling" in parts else default_only:
        work = args.work / f"len{seq_len}-batch{batch}"
        work.mkdir()
        pargs = point_args(args, work, seq_len, batch)
        bench_train.spawn(pargs, "prepare", f"prepare-{seq_len}x{batch}")
        if (seq_len, batch) == (81, 8) and "overhead" in parts:
            for p in args.profile_precisions.split(","):
                run = bench_train.spawn(pargs, f"ropo_overhead_{p}", f"overhead-{p}")
                overhead[p] = {k: v for k, v in run.items() if k != "discarded_runs"}
                print(json.dumps({"overhead": p, "median_paired": run["median_paired_overhead"],
                                  "median_step_seconds": run["median_step_seconds"]}), flush=True)
        if (seq_len, batch) == (81, 8) and "profile" in parts:
            profiles = {p: bench_train.spawn(pargs, f"ropo_{p}_profile", f"profile-{p}")
                        for p in args.profile_precisions.split(",")}
        if "scaling" not in parts:
            continue
        runs = {side: bench_train.spawn(pargs, side, f"{side}-{seq_len}x{batch}") for side in ("ropo_fp32", "base")}
        r, b = runs["ropo_fp32"], runs["base"]
        points.append({
            "seq_len": seq_len, "batch_pairs": batch,
            "step_seconds": {s: v["step_seconds"] for s, v in runs.items()},
            "tokens_per_step": r["tokens"] / r["steps"],
            "pairs_per_s": {s: v["pairs_per_s"] for s, v in runs.items()},
            "ropo_overhead_forward_backward": (r["phase_seconds"]["forward"] + r["phase_seconds"]["backward"])
            / (b["phase_seconds"]["forward"] + b["phase_seconds"]["backward"]) - 1,
            "phase_seconds": {s: v["phase_seconds"] for s, v in runs.items()},
            "other_cores": {s: v["contention"]["other_cores"] for s, v in runs.items()},
            "peak_rss_mib": {s: v["peak_rss_mib"]["vmhwm"] for s, v in runs.items()},
        })
        print(json.dumps({k: points[-1][k] for k in ("seq_len", "batch_pairs", "step_seconds",
                                                     "ropo_overhead_forward_backward")}), flush=True)
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": benchlib.machine(threads=2),
        "profile": {precision: {
            "steps": p["steps"], "step_seconds": p["step_seconds"],
            "phase_seconds_per_step": {k: v / p["steps"] for k, v in p["phase_seconds"].items()},
            "self_seconds_per_step": {k: v / p["steps"] for k, v in p["profile_self_seconds"].items()},
            "other_cores": p["contention"]["other_cores"],
        } for precision, p in profiles.items()},
        "profile_note": "self time = time inside each op on the calling thread (an op's two compute threads "
                        "are not counted twice); the profiler adds its own overhead to the step",
        "overhead": overhead,
        "layer": layers,
        "scaling": points,
        "total_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    benchlib.main(parse_args(), lambda a: None, drive, "bench-step-", ("scaling",))


if __name__ == "__main__":
    main()
