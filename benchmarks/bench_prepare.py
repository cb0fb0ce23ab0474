"""Peak memory of `ropo-ray prepare` (and, with --cache, of the reference cache stage) against input size.

    python benchmarks/bench_prepare.py --pairs 100000 1000000                 # -> results/prepare.json
    python benchmarks/bench_prepare.py --cache --pairs 10000 100000 --out benchmarks/results/cache_memory.json

For each size, N generated pairs (the built-in task's pairs, each prompt numbered so every pair is new and
survives deduplication) are written as JSONL, and `ropo-ray prepare` runs on them in a child process that
starts its own local Ray (so the whole job is that process's tree: driver, GCS, raylet, Ray Data workers).
With --cache, `ropo-ray cache` then runs on the prepared pairs the same way (the built-in task's model as the
reference; a fresh cache folder per size; `cache.num_actors` actors, default 1) and is measured on its own.
A sampler reads every process of the tree every 0.5 s:

- the tree's summed PSS (proportional set size, /proc/PID/smaps_rollup): resident memory with shared pages
  (the object store's shared memory, shared libraries) split between the processes that map them, so
  nothing is counted twice;
- the largest RSS of any single process of the tree.

Memory is bounded when these peaks stay flat while the input grows tenfold. Sizes run one after the other
on a machine left otherwise quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib
import psutil

from ropo_ray.config import load_config
from ropo_ray.runs import resolve_model


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak summed PSS and peak single-process RSS of a process and its descendants."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.period = psutil.Process(pid), period
        self.peak_pss_kib = self.peak_rss_kib = self.peak_processes = 0
        self.samples = 0
        self.at_peak: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total, largest, each = 0, 0, []
            for proc in procs:
                pss = pss_kib(proc.pid)
                total += pss
                try:
                    largest = max(largest, proc.memory_info().rss // 1024)
                    each.append((pss, " ".join(proc.cmdline())[:80]))
                except psutil.NoSuchProcess:
                    pass
            if total > self.peak_pss_kib:  # who holds the memory at the peak
                self.at_peak = [{"pss_mib": k / 1024, "process": name} for k, name in sorted(each, reverse=True)[:6]]
            self.peak_pss_kib = max(self.peak_pss_kib, total)
            self.peak_rss_kib = max(self.peak_rss_kib, largest)
            self.peak_processes = max(self.peak_processes, len(procs))
            self.samples += 1
            self.stop.wait(self.period)


def write_pairs(model_dir: Path, out: Path, count: int) -> int:
    """`count` pairs, streamed to `out`; returns the file's size in bytes."""
    base = [json.loads(x) for x in (model_dir / "task" / "pairs.jsonl").read_text().splitlines() if x.strip()]
    with out.open("w") as f:
        for i in range(count):
            row = base[i % len(base)]
            f.write(json.dumps({**row, "prompt": f"({i // len(base)}) {row['prompt']}"}) + "\n")
    return out.stat().st_size


def measured(command: str, overrides: list[str], what: str) -> dict:
    """Run `ropo-ray <command> <overrides>` in a child process with its own local Ray, sampling its tree."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, inside the measured tree
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ropo_ray.cli", command, *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{output[-3000:]}")
    return {"seconds": seconds, "peak_tree_pss_mib": sampler.peak_pss_kib / 1024,
            "peak_process_rss_mib": sampler.peak_rss_kib / 1024, "peak_processes": sampler.peak_processes,
            "samples": sampler.samples, "largest_processes_at_peak": sampler.at_peak,
            "log_tail": output.strip().splitlines()[-6:]}


def run_size(work: Path, model_dir: Path, count: int, cache: bool, settings: list[str]) -> dict:
    data = work / f"pairs-{count}.jsonl"
    size = write_pairs(model_dir, data, count)
    overrides = [f"pipeline.run_dir={work}/run-{count}", f"data.train_files=[{data}]",
                 f"cache.root={work}/cache-{count}", *settings]
    prep = measured("prepare", overrides, f"prepare on {count} pairs")
    summary = json.loads((work / f"run-{count}" / "data" / "manifest.json").read_text())
    out = {"pairs": count, "input_bytes": size, **prep, "pairs_per_s": count / prep["seconds"],
           "rows": {k: summary[k] for k in ("kept", "train", "eval", "rejected", "duplicates")}}
    if cache:
        out["cache"] = measured("cache", overrides, f"the cache stage on {count} pairs")
        out["cache"]["pairs_per_s"] = summary["kept"] / out["cache"]["seconds"]
    data.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cache", action="store_true", help="also measure `ropo-ray cache` on each size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare.json"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both stages, e.g. cache.num_actors=2")
    args = parser.parse_args()
    model_dir = resolve_model(load_config(None, []))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as work:
        for count in args.pairs:
            runs.append(run_size(Path(work), model_dir, count, args.cache, args.set))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "log_tail"}), flush=True)
    report = {
        "command": "python " + " ".join(sys.argv),
        "settings": args.set,
        "machine": benchlib.machine(),
        "runs": runs,
        "peak_tree_pss_ratio_largest_vs_smallest": runs[-1]["peak_tree_pss_mib"] / runs[0]["peak_tree_pss_mib"],
        **({"cache_peak_tree_pss_ratio_largest_vs_smallest": runs[-1]["cache"]["peak_tree_pss_mib"]
            / runs[0]["cache"]["peak_tree_pss_mib"]} if args.cache else {}),
        "note": "tree = the prepare process and every descendant (its own local Ray); PSS splits shared pages",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
