"""Joining the prepared pairs with the cached reference log-probs before training: the broadcast join
`ropo_ray.train.ray_trainer.joined_dataset` uses against the Ray Data hash join it replaced.

    python benchmarks/bench_join.py [--pairs 200 20000] [--repeats 3] [--out benchmarks/results/join.json]

Both sides run in one local Ray (2 CPUs), on the same synthetic prepared split (token-id lists of the
built-in task's lengths) and the same published cache, alternating which goes first; each gives the
same rows in the same order (checked), so the seconds compare like with like. Before each side the
machine must be quiet (the other side's processes wound down). The hash-join side is
the former code: `pairs.join(cache, num_partitions=2)`, then the same sort and split repartition.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path

import benchlib
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ropo_ray.refcache.store import CACHE_SCHEMA, part_paths, publish, verify
from ropo_ray.runs import start_local_ray
from ropo_ray.train.ray_trainer import BLOCK_ROWS, PAIR_COLUMNS, REF_COLUMNS, joined_dataset


def write_inputs(root: Path, pairs: int) -> tuple[Path, Path]:
    """A prepared `train` split of `pairs` rows in parquet parts of 10,000 and a cache holding them all
    (plus as many pairs of another dataset, as a shared cache has)."""
    ids = [hashlib.sha256(f"pair {i}".encode()).hexdigest()[:32] for i in range(2 * pairs)]
    prepared = root / f"prepared-{pairs}" / "train"
    prepared.mkdir(parents=True)
    for start in range(0, pairs, 10_000):
        rows = range(start, min(pairs, start + 10_000))
        pq.write_table(pa.table({
            "pair_id": [ids[i] for i in rows],
            "prompt_ids": [[(i + t) % 500 for t in range(24 + i % 17)] for i in rows],
            "chosen_ids": [[(3 * i + t) % 500 for t in range(8 + i % 11)] for i in rows],
            "rejected_ids": [[(5 * i + t) % 500 for t in range(6 + i % 13)] for i in rows],
        }), prepared / f"part-{start // 10_000:05d}.parquet")
    cache = root / f"cache-{pairs}"
    local = root / f"cache-parts-{pairs}"
    local.mkdir()
    part = local / "part-00000.parquet"
    pq.write_table(pa.table({"pair_id": ids, "ref_chosen_logps": [-float(i % 97) for i in range(2 * pairs)],
                             "ref_rejected_logps": [-float(i % 89) for i in range(2 * pairs)],
                             "chosen_tokens": [8] * (2 * pairs), "rejected_tokens": [6] * (2 * pairs)},
                            schema=CACHE_SCHEMA), part)
    publish(cache, [part], {"benchmark": pairs})
    return prepared.parent, cache


def hash_join(prepared: Path, cache: Path) -> tuple[ray.data.Dataset, int]:
    """The former `joined_dataset`: Ray Data's hash join (2 partitions), sorted, split into blocks."""
    pairs = ray.data.read_parquet(sorted(str(p) for p in (prepared / "train").glob("*.parquet"))
                                  ).select_columns(PAIR_COLUMNS)
    entries = ray.data.read_parquet(part_paths(cache, verify(cache))).select_columns(REF_COLUMNS)
    expected = pairs.count()
    joined = (pairs.join(entries, join_type="inner", num_partitions=2, on=("pair_id",))
              .sort("pair_id").repartition(max(1, math.ceil(expected / BLOCK_ROWS))))
    joined.context.execution_options.preserve_order = True
    joined = joined.materialize()
    return joined, joined.count()


SIDES = {"hash_join": hash_join, "broadcast": lambda prepared, cache: joined_dataset(prepared, cache, "train")}


def blocks(ds: ray.data.Dataset) -> list[list[str]]:
    return [b.column("pair_id").to_pylist() for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]


def drive(args: argparse.Namespace) -> dict:
    start_local_ray(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    results = {}
    for pairs in args.pairs:
        prepared, cache = write_inputs(args.work, pairs)
        seconds: dict[str, list[float]] = {s: [] for s in SIDES}
        waited: list[float] = []
        for r in range(args.repeats):
            layouts = {}
            for side in list(SIDES)[r % 2:] + list(SIDES)[:r % 2]:
                waited.append(benchlib.wait_for_quiet(args))  # the other side's processes wind down first
                t0 = time.perf_counter()
                ds, rows = SIDES[side](prepared, cache)
                seconds[side].append(time.perf_counter() - t0)
                assert rows == pairs, (side, rows)
                layouts[side] = blocks(ds)
                print(f"{pairs} pairs, repeat {r}, {side}: {seconds[side][-1]:.1f} s", flush=True)
            assert layouts["hash_join"] == layouts["broadcast"], "the two joins gave different rows or blocks"
        medians = {s: statistics.median(v) for s, v in seconds.items()}
        results[str(pairs)] = {"seconds": seconds, "median_s": medians, "waited_for_quiet_s": waited,
                               "hash_join_over_broadcast": medians["hash_join"] / medians["broadcast"]}
    ray.shutdown()
    return {"machine": benchlib.machine(), "versions": benchlib.versions("ray", "pyarrow"),
            "command": " ".join(["python", "benchmarks/bench_join.py", *sys.argv[1:]]), "results": results}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[200, 20_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "join.json")
    benchlib.add_ray_bench_arguments(parser)
    return parser.parse_args()


if __name__ == "__main__":
    benchlib.main(parse(), lambda args: None, drive, "bench-join-")
