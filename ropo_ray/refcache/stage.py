"""`ropo-ray cache`: reference log-probs computed once, by a Ray Data actor pool, into the shared cache.

    prepared pairs, streamed in windows of cache.sort_window_rows -> drop the pairs the cache holds
      -> sort each window by length -> map_batches(RefLogpActor, pool) with token-budget micro-batches
      -> Parquet parts written by the driver -> published into <cache_root>/<key>/ with a checked manifest

Memory does not grow with the number of pairs: nothing is materialised, a window is the most any task holds,
per cached pair only its 32-character id is kept (to skip it), and a window is read only when the pairs already
read and not yet written leave room for it (`WindowCredit`): at most (num_actors + cache.read_ahead_windows)
windows plus one batch are in flight, however far ahead the zero-CPU reading could otherwise run.

A verified hit performs no reference forward at all; a grown dataset computes only its new pairs;
a cache whose files no longer match its manifest is rebuilt, never trusted. Forwards are counted
by a small Ray actor, so tests and the sweep can prove how many happened.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from ropo_ray.config.schema import Config, ModelConfig
from ropo_ray.data.blocks import max_block_bytes
from ropo_ray.refcache.compute import pair_width, reference_logps, rows_per_pair
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
# Ray Data's largest block in this stage (its default is 128 MiB). An actor of the pool is handed whole blocks
# and holds them while it scores them batch by batch: with a window as one block, two actors grew to about
# 1 GiB each on 100K pairs (356 and 331 MiB with 1 MiB blocks).
BLOCK_BYTES = 1 << 20


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


@ray.remote(num_cpus=0)
class WindowCredit:
    """Credit-based flow control between the window reader and the driver that writes the scored pairs.

    A window is read only after `acquire(rows)` grants its rows; rows leave when the driver has written them,
    or when the reader drops them (already cached). The reader needs no CPU, so without this nothing but
    Ray Data's object-store budget would stop it reading the whole dataset ahead of the pool.

    `bound` must be at least one window plus one batch: Ray Data's bundler may hold back fewer than
    `cache.batch_rows` rows waiting for more, so a bound below that could wait forever. Whenever a grant is
    refused, more than a batch is held, so the pool has work and the held rows drain.
    """

    def __init__(self, bound: int) -> None:
        import asyncio

        self.bound = bound
        self.held = 0
        self.peak = 0
        self.granted = 0
        self.released = 0
        self.changed = asyncio.Condition()

    async def acquire(self, rows: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.held + rows <= self.bound or self.held == 0)
            self.held += rows
            self.granted += rows
            self.peak = max(self.peak, self.held)

    async def release(self, rows: int) -> None:
        async with self.changed:
            self.held -= rows
            self.released += rows
            self.changed.notify_all()

    async def totals(self) -> dict[str, int]:
        return {"bound": self.bound, "peak": self.peak, "granted": self.granted, "released": self.released}


def in_flight_bound(window: int, cfg: Config) -> int:
    """The most pairs the cache stage holds between reading and writing them (see `WindowCredit`)."""
    return (cfg.cache.num_actors + cfg.cache.read_ahead_windows) * window + cfg.cache.batch_rows


def token_budget_batches(rows: list[dict], token_budget: int, shared_prompt: bool = False) -> list[list[dict]]:
    """Length-sorted rows packed so each forward holds at most `token_budget` tokens, padding included: rows
    of the batch x its widest pair (`pair_width`), each pair taking `rows_per_pair` rows (one in the
    shared-prompt layout, two stacked); at least one pair per batch."""
    per_pair = rows_per_pair(shared_prompt)
    batches: list[list[dict]] = []
    current: list[dict] = []
    width = 0
    for row in sorted(rows, key=lambda r: pair_width(r, shared_prompt)):
        grown = max(width, pair_width(row, shared_prompt))
        if current and per_pair * grown * (len(current) + 1) > token_budget:
            batches.append(current)
            current, grown = [], pair_width(row, shared_prompt)
        current.append(row)
        width = grown
    if current:
        batches.append(current)
    return batches


class RefLogpActor:
    """Holds the reference model; scores batches of pairs (map_batches over an actor pool) in the trainer's
    layout (`shared_prompt`: train.shared_prompt)."""

    def __init__(self, model_dir: str, tokenizer_dir: str, model_cfg: ModelConfig, token_budget: int,
                 counter: Any, shared_prompt: bool = False) -> None:
        import torch

        from ropo_ray.train.model_io import load_model, load_tokenizer

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.model = load_model(model_dir, model_cfg)
        self.pad_id = load_tokenizer(tokenizer_dir, model_cfg).pad_token_id
        self.token_budget = token_budget
        self.counter = counter
        self.shared_prompt = shared_prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.select(PAIR_COLUMNS).to_pylist()
        out = []
        micro = token_budget_batches(rows, self.token_budget, self.shared_prompt)
        for chunk in micro:
            for row, ref in zip(chunk, reference_logps(self.model, chunk, self.pad_id, batch_size=len(chunk),
                                                       shared_prompt=self.shared_prompt)):
                out.append({"pair_id": row["pair_id"], **ref})
        ray.get(self.counter.add.remote(len(micro), len(rows), time.perf_counter() - t0))
        return pa.Table.from_pylist(out, schema=CACHE_SCHEMA)


def _missing_windows(batch: dict[str, Any], fs: Any, known_ref: ray.ObjectRef,
                     credit: Any = None, shared_prompt: bool = False) -> Iterator[pa.Table]:
    """map_batches UDF: one window per input row, given as {path, first row, rows} slices of prepared Parquet
    files -> the window's pairs the cache lacks (known_ref: the cached ids, read from the object store without
    a copy) sorted by width in the layout they are scored in (`pair_width`), so each batch the pool gets holds
    pairs of about one length and pads little. Only the row groups a slice overlaps are read, and only once
    `credit` (a `WindowCredit`) grants the window's rows; the cached pairs dropped are handed back at once."""
    known = ray.get(known_ref)
    for slices in batch["slices"]:
        planned = sum(int(piece["rows"]) for piece in slices)
        if credit is not None:
            ray.get(credit.acquire.remote(planned))
        tables = []
        for piece in slices:
            path, first, rows = piece["path"], int(piece["first"]), int(piece["rows"])
            with fs.open_input_file(str(path)) as f:
                parquet = pq.ParquetFile(f)
                offset = 0
                for group in range(parquet.num_row_groups):
                    size = parquet.metadata.row_group(group).num_rows
                    lo, hi = max(first, offset), min(first + rows, offset + size)
                    if lo < hi:
                        table = parquet.read_row_group(group, columns=PAIR_COLUMNS)
                        tables.append(table.slice(lo - offset, hi - lo))
                    offset += size
        table = pa.concat_tables(tables)
        if known is not None and len(known):
            table = table.filter(pc.invert(pc.is_in(table["pair_id"], value_set=known)))
        if credit is not None and planned > table.num_rows:
            ray.get(credit.release.remote(planned - table.num_rows))
        chosen, rejected = pc.list_value_length(table["chosen_ids"]), pc.list_value_length(table["rejected_ids"])
        widths = pc.add(pc.list_value_length(table["prompt_ids"]),  # `pair_width`
                        pc.add(chosen, rejected) if shared_prompt else pc.max_element_wise(chosen, rejected))
        yield table.take(pc.sort_indices(widths))


def plan_windows(file_rows: list[tuple[str, int]], window_rows: int) -> list[list[dict[str, Any]]]:
    """Consecutive windows of `window_rows` rows (the last one shorter) over files given with their row
    counts, each as slices {path, first row, rows}: a window may span files and a file many windows."""
    windows: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    held = 0
    for path, rows in file_rows:
        start = 0
        while start < rows:
            take = min(rows - start, window_rows - held)
            current.append({"path": path, "first": start, "rows": take})
            held, start = held + take, start + take
            if held == window_rows:
                windows.append(current)
                current, held = [], 0
    if current:
        windows.append(current)
    return windows


def window_rows(total: int, cfg: Config) -> int:
    """cache.sort_window_rows, or fewer when the data is small: at least two windows per actor, so every
    actor of the pool gets work (a window reaches the pool as one block, and a block goes to one actor)."""
    per_actor = math.ceil(total / (2 * cfg.cache.num_actors))
    return max(1, min(cfg.cache.sort_window_rows, max(cfg.cache.batch_rows, per_actor)))


def _known_ids(cache_dir: Store, manifest: dict[str, Any] | None) -> pa.Array | None:
    """The pair_ids the cache already holds (only that column is read)."""
    if not (manifest and manifest["parts"]):
        return None
    dataset = pads.dataset(part_paths(cache_dir, manifest), format="parquet", filesystem=cache_dir.fs)
    return dataset.to_table(columns=["pair_id"])["pair_id"].combine_chunks()


def _count_missing(prepared: pads.Dataset, known: pa.Array | None) -> int:
    """Pairs of `prepared` not in `known`, reading only the pair_id column one record batch at a time."""
    missing = 0
    for batch in prepared.to_batches(columns=["pair_id"]):
        missing += batch.num_rows
        if known is not None:
            missing -= pc.sum(pc.is_in(batch["pair_id"], value_set=known)).as_py() or 0
    return missing


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


def _score(inputs: list[str], fs: Any, known_ref: Any, cfg: Config, model_dir: str | Path,
           tokenizer_dir: str | Path, counter: Any, cache_dir: Store, credit_totals: dict[str, int],
           rows_per_part: int = 200_000) -> list[Path]:
    """Reference log-probs of the pairs the cache lacks, written as uniquely named parts in a local scratch
    folder (beside a local cache, so publishing is a rename; in the temp folder for a remote one).

    The pairs stream: reading, filtering and sorting a window are zero-CPU tasks (one at a time) started from
    the driver's plan of windows (no listing or read task that needs a CPU), so the actor pool may hold every
    CPU and they still run; the driver consumes the actors' output, so no write task waits either. A window is
    read only when `WindowCredit` has room for it; the driver hands rows back as it writes them.
    `credit_totals` receives the credit's counts (its bound and the peak pairs in flight).
    """
    import tempfile

    parent = Path(tempfile.gettempdir()) if cache_dir.remote else Path(cache_dir.parent().path)
    tmp = parent / f".{cache_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    file_rows = []
    for path in inputs:
        with fs.open_input_file(path) as f:
            file_rows.append((path, pq.ParquetFile(f).metadata.num_rows))
    window = window_rows(sum(n for _, n in file_rows), cfg)
    plan = plan_windows(file_rows, window)
    credit = WindowCredit.remote(in_flight_bound(window, cfg))
    with max_block_bytes(BLOCK_BYTES):  # set before the datasets are built: each keeps the context it was built in
        windows = ray.data.from_items([{"slices": w} for w in plan], override_num_blocks=len(plan)).map_batches(
            _missing_windows, fn_args=(fs, known_ref, credit, cfg.train.shared_prompt), batch_size=1, num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=1))
        scored = windows.map_batches(
            RefLogpActor, fn_constructor_args=(str(model_dir), str(tokenizer_dir), cfg.model, cfg.cache.token_budget,
                                               counter, cfg.train.shared_prompt),
            batch_format="pyarrow", batch_size=cfg.cache.batch_rows,
            compute=ray.data.ActorPoolStrategy(size=cfg.cache.num_actors), num_cpus=cfg.cache.cpus_per_actor)
        parts: list[Path] = []
        released: list[ray.ObjectRef] = []
        writer, written = None, 0
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            if writer is None or written >= rows_per_part:
                if writer is not None:
                    writer.close()
                parts.append(tmp / f"part-{uuid.uuid4().hex}.parquet")
                writer, written = pq.ParquetWriter(str(parts[-1]), CACHE_SCHEMA), 0
            writer.write_table(table.cast(CACHE_SCHEMA))
            written += table.num_rows
            released.append(credit.release.remote(table.num_rows))
            if len(released) > 64:  # an async actor keeps no call order: wait for them before asking the totals
                ray.get(released)
                released.clear()
    if writer is not None:
        writer.close()
    ray.get(released)
    credit_totals.update(ray.get(credit.totals.remote()))
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
    credit: dict[str, int] = {}
    if prepared["kept"] == 0:
        raise ValueError(f"{prepared_dir}: the prepared data holds no pairs (see its rejects/)")
    if manifest and prepared["fingerprint"] in manifest.get("covered", []):
        total, n_missing = prepared["kept"], 0
    else:
        parts = [p.path for s in ("train", "eval") for p in prepared_dir.child(s).files(".parquet")]
        known = _known_ids(cache_dir, manifest)
        total = prepared["kept"]
        n_missing = _count_missing(pads.dataset(parts, format="parquet", filesystem=prepared_dir.fs), known)
        written = (_score(parts, prepared_dir.fs, ray.put(known), cfg, model_dir, tokenizer_dir, counter, cache_dir,
                          credit)
                   if n_missing else [])
        scored = sum(pq.ParquetFile(p).metadata.num_rows for p in written)
        if scored != n_missing:  # never publish a cache that silently lacks pairs
            for folder in {w.parent for w in written}:
                shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"cache: {n_missing} pairs were missing but {scored} were scored; nothing published")
        manifest = publish(cache_dir, written, fields, covered=prepared["fingerprint"])
        if written:
            shutil.rmtree(written[0].parent, ignore_errors=True)
    counts = ray.get(counter.totals.remote())
    summary = {"cache_dir": cache_dir.location, "key": cache_dir.name, "pairs": total, "computed": n_missing,
               "reused": total - n_missing, "reference_forwards": counts["forwards"],
               "scored_pairs": counts["pairs"], "actor_seconds": counts["seconds"], "cache_rows": manifest["rows"],
               "in_flight": credit,  # WindowCredit's bound, peak, granted and released pairs (empty on a hit)
               "seconds": time.perf_counter() - t0}
    log(f"cache: {summary['reused']} of {total} pairs reused, {n_missing} computed with "
        f"{counts['forwards']} reference forwards in {summary['seconds']:.1f} s -> {cache_dir}"
        + (f" (at most {credit['peak']} pairs in flight, bound {credit['bound']})" if credit else ""))
    return summary
