"""The band kernel of this tree against the kernel of an earlier revision, on both allocators of the workers.

    python benchmarks/bench_kernel.py --against b62a10c      # -> results/kernel.json

Builds kernels/band_chain.c of the working tree and of git revision --against (with the flags
ropo_ray/adapters/native.py uses), then, in one process per allocator (glibc's malloc; jemalloc preloaded with
train.jemalloc_conf's default, as a Ray Train worker starts), times `chain_forward` and `chain_backward` of the
benchmark model's RoPO layer (640 wide, block sizes (2, 4, 8), 1,296 bf16 rows: a step of 8 pairs of 81 tokens)
alternating the two builds call by call. Each call takes the next of 40 inputs (a 200 MB working set, so
the rows are cold in cache, as in a training step). Medians over 7 rounds of 40 calls after one untimed round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchlib

from ropo_ray.config.training import TrainConfig
from ropo_ray.train.allocator import worker_env

ROWS, DIM, INPUTS, ROUNDS = 1296, 640, 40, 8
SOURCE = "ropo_ray/adapters/kernels/band_chain.c"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", default="b62a10c", help="git revision whose kernel to compare with")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel.json"))
    parser.add_argument("--threads", type=int, default=2)
    benchlib.add_quiet_arguments(parser, max_other_cores=0.2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def build(work: Path, against: str) -> dict[str, str]:
    """Shared objects of both kernels, built in `work`: {"tree": path, against: path}."""
    from ropo_ray.adapters import native

    texts = {"tree": Path(SOURCE).read_text(),
             against: subprocess.run(["git", "show", f"{against}:{SOURCE}"], capture_output=True, text=True,
                                     check=True).stdout}
    built = {}
    for name, text in texts.items():
        src, lib = work / f"band_chain-{name}.c", work / f"band_chain-{name}.so"
        src.write_text(text)
        native.build_version(src, lib)
        built[name] = str(lib)
    return built


def run_side(args: argparse.Namespace) -> None:
    """Time both builds alternately in this process (on whatever allocator it was started with)."""
    import torch

    from ropo_ray.adapters import native
    from ropo_ray.adapters.ropo_linear import RoPOLinear
    from ropo_ray.adapters.rotation import kernel_spec
    from ropo_ray.train.allocator import loaded_allocator

    torch.set_num_threads(args.threads)
    libs = {name: native.open_version(Path(path), ("chain_forward", "chain_backward"))
            for name, path in json.loads((args.work / "builds.json").read_text()).items()}
    torch.manual_seed(0)
    layer = RoPOLinear(torch.nn.Linear(DIM, DIM, bias=False).bfloat16())
    with torch.no_grad():
        for p in layer.rotation:
            p.normal_(0, 0.05)
    packed = layer.coefficients().detach().contiguous()
    spec, nf = kernel_spec(tuple(layer._bands)), len(layer._bands)
    xs = [torch.randn(ROWS, DIM).bfloat16() for _ in range(INPUTS)]
    gs = [torch.randn(ROWS, DIM).bfloat16() for _ in range(INPUTS)]
    times = {name: {"forward": [], "backward": []} for name in libs}
    outputs = {}
    for r in range(ROUNDS):
        for i in range(INPUTS):
            order = list(libs.items()) if i % 2 else list(reversed(libs.items()))
            for name, lib in order:
                y, gx, gc = torch.empty_like(xs[i]), torch.empty_like(xs[i]), torch.empty_like(packed)
                t0 = time.perf_counter()
                lib.chain_forward(xs[i].data_ptr(), 1, y.data_ptr(), 1, packed.data_ptr(), spec, nf, ROWS, DIM,
                                  args.threads)
                t1 = time.perf_counter()
                lib.chain_backward(xs[i].data_ptr(), 1, gs[i].data_ptr(), 1, gx.data_ptr(), 1, packed.data_ptr(),
                                   gc.data_ptr(), spec, nf, ROWS, DIM, args.threads)
                t2 = time.perf_counter()
                if r:
                    times[name]["forward"].append(t1 - t0)
                    times[name]["backward"].append(t2 - t1)
                if r == 0 and i == 0:
                    outputs[name] = (y, gx, gc)
    first, second = outputs.values()
    same = all(torch.equal(a, b) for a, b in zip(first, second))  # the same arithmetic in the same order
    result = {"allocator": loaded_allocator(), "same_outputs": same,
              "median_ms": {name: {k: statistics.median(v) * 1e3 for k, v in t.items()} for name, t in times.items()}}
    (args.work / f"result-{args.side}.json").write_text(json.dumps(result))


def drive(args: argparse.Namespace) -> dict:
    (args.work / "builds.json").write_text(json.dumps(build(args.work, args.against)))
    results = {}
    for allocator in ("system", "jemalloc"):
        waited = benchlib.wait_for_quiet(args)
        env = {**os.environ, **worker_env(allocator, os.environ.get("LD_PRELOAD", ""), TrainConfig().jemalloc_conf)}
        subprocess.run([sys.executable, __file__, "--side", allocator, "--work", str(args.work),
                        "--threads", str(args.threads)], env=env, check=True)
        results[allocator] = json.loads((args.work / f"result-{allocator}.json").read_text())
        results[allocator]["waited_for_quiet_seconds"] = waited
        print(allocator, json.dumps(results[allocator]["median_ms"]), flush=True)
    return {"command": "python " + " ".join(sys.argv), "machine": benchlib.machine(threads=args.threads),
            "against": args.against, "rows": ROWS, "dim": DIM, "block_sizes": [2, 4, 8], "dtype": "bfloat16",
            "inputs": INPUTS, "timed_rounds": ROUNDS - 1, "results": results}


def main() -> None:
    benchlib.main(parse_args(), run_side, drive, "bench-kernel-", ())


if __name__ == "__main__":
    main()
