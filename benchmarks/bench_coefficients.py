"""The rotation's kernel coefficients for a model's adapted layers: composed tensor ops against the native kernel.

    python benchmarks/bench_coefficients.py      # -> results/coefficients.json

What `share_rotations` computes once per model forward: the band kernel's packed coefficients of every adapted
layer of one shape, from the rotation parameters stacked over the layers, and their gradient in the backward. The
benchmark model's default targets (q, k, v, o of 10 layers): 40 layers 640 wide, block sizes (2, 4, 8), parameters
in bf16 as DeepSpeed's bf16 mode keeps them. Sides: `composed` (cayley.py's exact Cayley, band_coefficients,
pack_coefficients: the path before session 20, still the Neumann path) and `native` (coefficients.py). They
alternate call by call in one process; medians over --rounds after 3 untimed rounds. Values and gradients of the
two are compared once (max abs difference; the gradients are bf16, as the parameters).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import benchlib

LAYERS, DIM, BLOCKS = 40, 640, (2, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coefficients.json"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    benchlib.add_quiet_arguments(parser, max_other_cores=0.2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    return parser.parse_args()


def drive(args: argparse.Namespace) -> dict:
    import torch

    from ropo_ray.adapters.coefficients import packed_coefficients
    from ropo_ray.adapters.native import vector_lanes
    from ropo_ray.adapters.rotation import (
        band_coefficients,
        factor_blocks,
        kernel_layouts,
        num_skew_params,
        pack_coefficients,
        shared_factor_layouts,
    )

    torch.set_num_threads(args.threads)
    layouts = shared_factor_layouts(DIM, BLOCKS, "shift")
    bands = kernel_layouts(DIM, BLOCKS, "shift", vector_lanes())
    gen = torch.Generator().manual_seed(0)
    params = [[(0.05 * torch.randn(lay.num_blocks, num_skew_params(lay.block_size), generator=gen)).bfloat16()
               .requires_grad_() for lay in layouts] for _ in range(LAYERS)]

    def composed(stacked):
        return pack_coefficients([band_coefficients(factor_blocks(p, lay), band)
                                  for p, lay, band in zip(stacked, layouts, bands)], layers=LAYERS)

    def native(stacked):
        return packed_coefficients(stacked, layouts, bands)

    sides = {"composed": composed, "native": native}
    upstream = None
    times = {name: {"forward": [], "backward": []} for name in sides}
    results = {}
    waited = benchlib.wait_for_quiet(args)
    for r in range(3 + args.rounds):
        for name in sides if r % 2 else reversed(sides):
            for layer in params:
                for p in layer:
                    p.grad = None
            t0 = time.perf_counter()
            stacked = [torch.stack([layer[f] for layer in params]) for f in range(len(layouts))]  # as share_rotations
            packed = sides[name](stacked)
            t1 = time.perf_counter()
            if upstream is None:
                upstream = torch.randn(packed.shape, generator=gen)
            packed.backward(upstream)
            t2 = time.perf_counter()
            if r >= 3:
                times[name]["forward"].append(t1 - t0)
                times[name]["backward"].append(t2 - t1)
            if r == 0:
                results[name] = (packed.detach(), [p.grad.float().clone() for layer in params for p in layer])
    (values_a, grads_a), (values_b, grads_b) = results["composed"], results["native"]
    medians = {name: {k: statistics.median(v) * 1e3 for k, v in t.items()} for name, t in times.items()}
    return {"command": "python " + " ".join(sys.argv), "machine": benchlib.machine(threads=args.threads),
            "layers": LAYERS, "dim": DIM, "block_sizes": list(BLOCKS), "parameter_dtype": "bfloat16",
            "rounds": args.rounds, "waited_for_quiet_seconds": waited,
            "median_ms": medians,
            "native_speedup": {k: medians["composed"][k] / medians["native"][k] for k in ("forward", "backward")},
            "max_abs_difference": {"values": (values_a - values_b).abs().max().item(),
                                   "gradients": max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)),
                                   "largest_gradient": max(a.abs().max().item() for a in grads_a)}}  # bf16 steps


def main() -> None:
    benchlib.main(parse_args(), lambda args: None, drive, "bench-coefficients-", ())


if __name__ == "__main__":
    main()
