"""What every side-by-side benchmark here shares: reading the machine's load, and the driver's main().

Each benchmark runs its sides in child processes of itself (`--side NAME`); the driver makes a work
folder, runs `drive(args)`, removes the folder even when killed, and writes the JSON report.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat, every core)."""
    import os

    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system, irq softirq steal


def wait_for_quiet(args: Any) -> float:
    """Wait (up to args.max_wait s) until the machine uses under args.quiet_cores; returns seconds waited."""
    import time

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.max_wait:
        b0, w0 = machine_busy_seconds(), time.perf_counter()
        time.sleep(3.0)
        if (machine_busy_seconds() - b0) / (time.perf_counter() - w0) < args.quiet_cores:
            break
        time.sleep(7.0)
    return time.perf_counter() - t0


VECTOR_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx2", "fma", "asimd", "sve")


def machine(**extra: Any) -> dict[str, Any]:
    """What the figures depend on: cores, memory, the CPU's model and vector instruction sets (the band
    kernel's vector width and bf16 matmul speed follow them: an AVX2-only CPU has no native bf16), platform."""
    import os
    import platform

    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", info.get("Features", "")).split())
    return {"cpus": os.cpu_count(), "cpu": info.get("model name", platform.processor()),
            "vector_flags": [f for f in VECTOR_FLAGS if f in flags], "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), **extra}


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in packages}


def main(args: Any, run_side: Callable[[Any], None], drive: Callable[[Any], dict], prefix: str,
         hidden: Sequence[str] = ("runs",)) -> None:
    """A side process runs its side; the driver runs `drive` in a fresh work folder and writes args.out."""
    if args.side:
        run_side(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the work folder is removed on kill
    args.work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        report = drive(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in hidden}, indent=2))


def rotated_repeats(repeats: int, sides: Sequence[str], measure_ceilings: Callable[[], dict[str, float]],
                    run: Callable[[str, int], dict]) -> tuple[dict[str, list[dict]], list[dict[str, float]]]:
    """Each repeat measures the matmul ceilings, then runs every side once, starting one side later than
    the repeat before, so no side always runs first (or last) on a machine whose speed drifts."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    ceilings = []
    for r in range(repeats):
        ceilings.append(measure_ceilings())
        print(f"repeat {r}: ceilings fp32 {ceilings[-1]['fp32'] / 1e9:.0f}, bf16 {ceilings[-1]['bf16'] / 1e9:.0f} "
              "GFLOP/s", flush=True)
        for side in list(sides[r % len(sides):]) + list(sides[:r % len(sides)]):
            runs[side].append(run(side, r))
    return runs, ceilings


def add_ray_bench_arguments(parser: Any) -> None:
    """The options of a bench whose sides run in its own process on one local Ray: waiting for a quiet machine
    (every process counts, this Ray's idle ones included) and `main`'s --side, which such a bench never sets."""
    import argparse

    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="start a side only when the machine (this Ray's idle processes included) uses fewer cores")
    parser.add_argument("--max-wait", type=float, default=120.0, help="longest wait for a quiet machine, s")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)


def add_quiet_arguments(parser: Any, max_other_cores: float) -> None:
    """The options of waiting for a quiet machine and redoing a side that was disturbed."""
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="start a side only when other processes use fewer cores than this")
    parser.add_argument("--max-other-cores", type=float, default=max_other_cores,
                        help="redo a side if other processes used more cores than this in its timed window")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=900.0, help="longest wait for a quiet machine, s")
