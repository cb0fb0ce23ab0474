"""`ropo-ray cache`: reference log-probs computed once, by a Ray Data actor pool, into the shared cache.

    prepared pairs -left-anti-join-> pairs the cache lacks -> sort by length
      -> map_batches(RefLogpActor, concurrency=pool) with token-budget micro-batches
      -> Parquet parts -> published into <cache_root>/<key>/ with a checked manifest

A verified hit performs no reference forward at all; a grown dataset computes only its new pairs;
a cache whose files no longer match its manifest is rebuilt, never trusted. Forwards are counted
by a small Ray actor, so tests and the sweep can prove how many happened.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from ropo_ray.config.schema import Config, ModelConfig
from ropo_ray.refcache.compute import pair_width, reference_logps
from ropo_ray.refcache.store import (
    CACHE_SCHEMA,
    CacheCorrupt,
    cache_key,
    key_fields,
    part_paths,
    publish,
    verify,
)
from ropo_ray.storage import Store, store

PAIR_COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]


@ray.remote(num_cpus=0)
class ForwardCounter:
    """Counts reference forwards (model calls) and the pairs they scored, across the actor pool."""

    def __init__(self) -> None:
        self.forwards = 0
        self.pairs = 0
        self.seconds = 0.0

    def add(self, forwards: int, pairs: int, seconds: float) -> None:
        self.forwards += forwards
        self.pairs += pairs
        self.seconds += seconds

    def totals(self) -> dict[str, float]:
        return {"forwards": self.forwards, "pairs": self.pairs, "seconds": self.seconds}


def token_budget_batches(rows: list[dict], token_budget: int) -> list[list[dict]]:
    """Length-sorted rows packed so each [2B, T] forward holds at most `token_budget` tokens, padding
    included (2 x rows x the longest sequence); at least one row per batch."""
    batches: list[list[dict]] = []
    current: list[dict] = []
    width = 0
    for row in sorted(rows, key=pair_width):
        grown = max(width, pair_width(row))
        if current and 2 * grown * (len(current) + 1) > token_budget:
            batches.append(current)
            current, grown = [], pair_width(row)
        current.append(row)
        width = grown
    if current:
        batches.append(current)
    return batches


class RefLogpActor:
    """Holds the reference model; scores batches of pairs (map_batches over an actor pool)."""

    def __init__(self, model_dir: str, tokenizer_dir: str, model_cfg: ModelConfig, token_budget: int,
                 counter: Any) -> None:
        import torch

        from ropo_ray.train.model_io import load_model, load_tokenizer

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.model = load_model(model_dir, model_cfg)
        self.pad_id = load_tokenizer(tokenizer_dir, model_cfg).pad_token_id
        self.token_budget = token_budget
        self.counter = counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.select(PAIR_COLUMNS).to_pylist()
        out = []
        micro = token_budget_batches(rows, self.token_budget)
        for chunk in micro:
            for row, ref in zip(chunk, reference_logps(self.model, chunk, self.pad_id, batch_size=len(chunk))):
                out.append({"pair_id": row["pair_id"], **ref})
        ray.get(self.counter.add.remote(len(micro), len(rows), time.perf_counter() - t0))
        return pa.Table.from_pylist(out, schema=CACHE_SCHEMA)


def _with_tokens(batch: pa.Table) -> pa.Table:
    rows = batch.select(PAIR_COLUMNS).to_pylist()
    return batch.select(PAIR_COLUMNS).append_column("pair_width", pa.array([pair_width(r) for r in rows],
                                                                           pa.int32()))


def cache_dir_for(cfg: Config, model_dir: str | Path, tokenizer_dir: str | Path) -> tuple[Store, dict[str, Any]]:
    fields = key_fields(model_dir, tokenizer_dir, cfg.data, cfg.model)
    return Store(cfg.cache.root).child(cache_key(fields)), fields


def _trusted_manifest(cache_dir: Store, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The verified manifest, or None (a corrupt cache is removed so it is rebuilt, never trusted)."""
    if not cache_dir.exists():
        return None
    try:
        return verify(cache_dir)
    except CacheCorrupt as err:
        log(f"cache: {err}; rebuilding {cache_dir}")
        cache_dir.remove()
        return None


def _score(missing: ray.data.Dataset, cfg: Config, model_dir: str | Path, tokenizer_dir: str | Path, counter: Any,
           cache_dir: Store, rows_per_part: int = 200_000) -> list[Path]:
    """Reference log-probs of the missing pairs, written as uniquely named parts in a local scratch
    folder (beside a local cache, so publishing is a rename; in the temp folder for a remote one).

    The input is sorted and materialised first and the driver consumes the actors' output, so the
    actor pool may hold every CPU (no read, sort or write task has to wait for one).
    """
    import tempfile

    import pyarrow.parquet as pq

    parent = Path(tempfile.gettempdir()) if cache_dir.remote else Path(cache_dir.parent().path)
    tmp = parent / f".{cache_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    # blocks of batch_rows rows, so every actor of the pool gets work (a sort can leave one big block)
    ordered = missing.sort("pair_width").repartition(target_num_rows_per_block=cfg.cache.batch_rows).materialize()
    scored = ordered.map_batches(
        RefLogpActor, fn_constructor_args=(str(model_dir), str(tokenizer_dir), cfg.model, cfg.cache.token_budget,
                                           counter),
        batch_format="pyarrow", batch_size=cfg.cache.batch_rows,
        compute=ray.data.ActorPoolStrategy(size=cfg.cache.num_actors), num_cpus=cfg.cache.cpus_per_actor)
    parts: list[Path] = []
    writer, written = None, 0
    for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        if writer is None or written >= rows_per_part:
            if writer is not None:
                writer.close()
            parts.append(tmp / f"part-{uuid.uuid4().hex}.parquet")
            writer, written = pq.ParquetWriter(str(parts[-1]), CACHE_SCHEMA), 0
        writer.write_table(table.cast(CACHE_SCHEMA))
        written += table.num_rows
    if writer is not None:
        writer.close()
    return parts


def build_cache(cfg: Config, model_dir: str | Path, tokenizer_dir: str | Path, prepared_dir: str | Path,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make sure every prepared pair has its reference log-probs in the cache; returns counts."""
    t0 = time.perf_counter()
    cache_dir, fields = cache_dir_for(cfg, model_dir, tokenizer_dir)
    prepared_dir = store(prepared_dir)
    prepared = prepared_dir.child("manifest.json").read_json()
    manifest = _trusted_manifest(cache_dir, log)
    counter = ForwardCounter.remote()
    if prepared["kept"] == 0:
        raise ValueError(f"{prepared_dir}: the prepared data holds no pairs (see its rejects/)")
    if manifest and prepared["fingerprint"] in manifest.get("covered", []):
        total, n_missing = prepared["kept"], 0
    else:
        parts = [p.path for s in ("train", "eval") for p in prepared_dir.child(s).files(".parquet")]
        pairs = ray.data.read_parquet(parts, filesystem=prepared_dir.fs).select_columns(PAIR_COLUMNS)
        total = pairs.count()
        missing = pairs
        if manifest and manifest["parts"]:
            known = ray.data.read_parquet(part_paths(cache_dir, manifest), filesystem=cache_dir.fs
                                          ).select_columns(["pair_id"])
            missing = pairs.join(known, join_type="left_anti", num_partitions=max(2, cfg.cache.num_actors * 2),
                                 on=("pair_id",))
        missing = missing.map_batches(_with_tokens, batch_format="pyarrow").materialize()
        n_missing = missing.count()
        parts = _score(missing, cfg, model_dir, tokenizer_dir, counter, cache_dir) if n_missing else []
        manifest = publish(cache_dir, parts, fields, covered=prepared["fingerprint"])
        if parts:
            shutil.rmtree(parts[0].parent, ignore_errors=True)
    counts = ray.get(counter.totals.remote())
    summary = {"cache_dir": cache_dir.location, "key": cache_dir.name, "pairs": total, "computed": n_missing,
               "reused": total - n_missing, "reference_forwards": counts["forwards"],
               "scored_pairs": counts["pairs"], "actor_seconds": counts["seconds"], "cache_rows": manifest["rows"],
               "seconds": time.perf_counter() - t0}
    log(f"cache: {summary['reused']} of {total} pairs reused, {n_missing} computed with "
        f"{counts['forwards']} reference forwards in {summary['seconds']:.1f} s -> {cache_dir}")
    return summary
