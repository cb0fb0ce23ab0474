"""`ropo-ray prepare`: preference files -> validated, tokenised, deduplicated Parquet, on Ray Data.

    read (one task per file, streamed in chunks) -> parse / normalise / validate / tokenise
    (an actor pool holding the tokenizer) -> stage/ partitioned by split and by pair_id hash bucket
    -> one task per bucket marks its duplicates -> train/, eval/, rejects/
    -> manifest.json (counts, fingerprint), published by moving the finished folder into place.

The output folder may be local or an object-store URI (ropo_ray.storage): Ray Data's tasks write
and read it through the same pyarrow filesystem on whichever node they run.

Memory stays bounded whatever the input size: files are read in chunks, every step streams, and
the deduplication needs no all-to-all shuffle. Rows with the same pair_id land in the same bucket
when the stage is written, and the number of buckets grows with the input (one per
`data.dedup_bucket_bytes` of input), so the one bucket a deduplication task holds stays the same
size however large the input is.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ropo_ray.config.schema import Config, DataConfig, ModelConfig
from ropo_ray.data.blocks import max_block_bytes
from ropo_ray.data.rows import RAW_SCHEMA, ROW_SCHEMA, iter_raw_rows, prepare_row, rejected_row
from ropo_ray.data.sources import InputFile, filesystem_of, inputs_fingerprint, resolve_inputs
from ropo_ray.fingerprint import hash_json, tokenizer_fingerprint
from ropo_ray.storage import Store, store

MANIFEST = "manifest.json"
# Ray Data's largest block while preparing (its default is 128 MiB): a tokenizer actor builds its output
# block in memory, so this, not the input's size, sets what the actor holds
BLOCK_BYTES = 16 << 20
SPLITS = ("train", "eval", "rejects")


def _read_files(batch: dict[str, Any], max_row_bytes: int) -> Iterator[pa.Table]:
    """map_batches UDF: one file per input row -> streamed tables of (source, row_index, raw, size)."""
    for uri, fmt in zip(batch["uri"], batch["format"]):
        fs, path, _ = filesystem_of(str(uri))
        opener = fs.open_input_file if fmt == "parquet" else fs.open_input_stream
        with opener(path) as stream:
            for chunk in iter_raw_rows(stream, str(fmt), max_row_bytes=max_row_bytes):
                yield pa.table({"source": [str(uri)] * len(chunk), "row_index": [i for i, _, _ in chunk],
                                "raw": [r for _, r, _ in chunk], "size": [n for _, _, n in chunk]},
                               schema=RAW_SCHEMA)


class RowPreparer:
    """Actor: holds the tokenizer, turns raw rows into kept or rejected rows."""

    def __init__(self, tokenizer_path: str, data_cfg: DataConfig, model_cfg: ModelConfig, buckets: int) -> None:
        from ropo_ray.train.model_io import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, model_cfg)
        self.cfg, self.buckets = data_cfg, buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [prepare_row(s, int(i), r, self.tokenizer, self.cfg, int(n)) for s, i, r, n in
                zip(batch["source"].to_pylist(), batch["row_index"].to_pylist(), batch["raw"].to_pylist(),
                    batch["size"].to_pylist())]
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        return table.append_column("bucket", pa.array([dedup_bucket(r["pair_id"], self.buckets) for r in rows],
                                                      pa.int32()))


def dedup_bucket(pair_id: str, buckets: int) -> int:
    """The deduplication bucket of a pair: hash bits other than the ones the train/eval split uses
    (pairs.is_eval_pair reads the first 8 hex digits). A rejected row (no pair_id) goes to bucket 0."""
    return int(pair_id[8:16], 16) % buckets if pair_id else 0


def dedup_buckets(input_bytes: int, bucket_bytes: int) -> int:
    """One bucket per `bucket_bytes` of input (at least one)."""
    return max(1, math.ceil(input_bytes / bucket_bytes))


def mark_duplicates(block: pa.Table, split: str) -> pa.Table:
    """Within one bucket (every row of a pair_id is in it): the first row (by source, row_index) of each
    pair_id stays in `split`, the others become rejects with reason duplicate_pair naming the kept row.

    Columnar: the rows are sorted in Arrow and only the duplicates pass through Python, so a bucket
    costs about twice its Arrow size, not its size as Python objects.
    """
    rows = block.select([c for c in ROW_SCHEMA.names if c != "split"]).sort_by(
        [("pair_id", "ascending"), ("source", "ascending"), ("row_index", "ascending")])
    n = rows.num_rows
    ids = rows["pair_id"].combine_chunks()
    repeat = np.zeros(n, dtype=bool)
    if n > 1:
        repeat[1:] = pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(n)))  # each row's first row of its pair_id
    kept = rows.filter(pa.array(~repeat))
    kept = kept.add_column(ROW_SCHEMA.get_field_index("split"), "split", pa.array([split] * kept.num_rows,
                                                                                  pa.string()))
    dup_at = np.flatnonzero(repeat)
    if not len(dup_at):
        return kept.cast(ROW_SCHEMA)
    dups = rows.take(pa.array(dup_at)).select(["source", "row_index", "raw"]).to_pylist()
    firsts = rows.take(pa.array(first[dup_at])).select(["source", "row_index"]).to_pylist()
    rejected = [rejected_row(d["source"], d["row_index"], d["raw"].encode(), "duplicate_pair",
                             f"same pair as {f['source']} row {f['row_index']}") for d, f in zip(dups, firsts)]
    return pa.concat_tables([kept.cast(ROW_SCHEMA), pa.Table.from_pylist(rejected, schema=ROW_SCHEMA)])


def _dedup_bucket_files(batch: dict[str, Any], split: str, fs: Any) -> Iterator[pa.Table]:
    """map_batches UDF: one bucket (its stage files) per input row -> its rows with duplicates marked."""
    for paths in batch["paths"]:
        pa.default_memory_pool().release_unused()  # the last bucket's buffers: give them back before the next
        table = pads.dataset(list(paths), format="parquet", filesystem=fs, partitioning=None).to_table()
        yield mark_duplicates(table, split)


def prepare_fingerprint(files: list[InputFile], cfg: Config, tokenizer_path: str) -> str:
    """Everything the prepared data depends on: inputs, data settings, tokenizer and chat template."""
    data = {k: v for k, v in asdict(cfg.data).items() if k != "dedup_bucket_bytes"}  # layout, not content
    return hash_json({"inputs": inputs_fingerprint(files), "data": data,
                      "tokenizer": tokenizer_fingerprint(tokenizer_path), "format": 1})


def read_manifest(out_dir: str | Path | Store) -> dict | None:
    return store(out_dir).child(MANIFEST).read_json_if_exists()


def _column_sums(folder: Store, columns: list[str]) -> tuple[int, dict[str, int]]:
    """Row count and per-column sums of a prepared folder, one record batch at a time."""
    dataset = folder.parquet_dataset()
    rows, sums = 0, dict.fromkeys(columns, 0)
    for batch in dataset.to_batches(columns=columns) if dataset is not None else ():
        rows += batch.num_rows
        for c in columns:
            sums[c] += int(pc.sum(batch[c]).as_py() or 0)
    return rows, sums


def _summarise(out: Store) -> dict[str, Any]:
    dataset = out.child("rejects").parquet_dataset()
    reasons: Counter = Counter()
    for batch in dataset.to_batches(columns=["reason"]) if dataset is not None else ():
        for item in pc.value_counts(batch["reason"]).to_pylist():
            reasons[item["values"]] += item["counts"]
    duplicates = reasons.pop("duplicate_pair", 0)
    counts, tokens = {}, {}
    for split in ("train", "eval"):
        counts[split], sums = _column_sums(out.child(split), ["prompt_tokens", "chosen_tokens", "rejected_tokens"])
        tokens[split] = sums if counts[split] else {}
    return {"kept": counts["train"] + counts["eval"], "train": counts["train"], "eval": counts["eval"],
            "rejected": sum(reasons.values()), "duplicates": duplicates,
            "rejected_by_reason": dict(sorted(reasons.items())), "tokens": tokens}


def _move_parts(src: Store, dst: Store, prefix: str) -> None:
    dst.makedirs()
    for i, part in enumerate(src.files(".parquet", recursive=True)):
        part.move_to(dst.child(f"{prefix}-{i:05d}.parquet"))


def _prepare_into(tmp: Store, inputs: list[InputFile], cfg: Config, tokenizer_path: str) -> tuple[int, int]:
    """The Ray Data stages into tmp/stage and tmp/dedup-<split>; returns (buckets, largest bucket's rows)."""
    import ray

    # tokenizer actors, leaving a CPU for the read and write tasks that feed and drain them
    workers = max(1, min(len(inputs), int(ray.cluster_resources().get("CPU", 1)) - 1))
    buckets = dedup_buckets(sum(f.size for f in inputs), cfg.data.dedup_bucket_bytes)
    raw = ray.data.from_items([{"uri": f.uri, "format": f.format} for f in inputs], override_num_blocks=len(inputs))
    read = raw.map_batches(_read_files, batch_size=1, fn_kwargs={"max_row_bytes": cfg.data.max_row_bytes})
    rows = read.map_batches(
        RowPreparer, fn_constructor_args=(tokenizer_path, cfg.data, cfg.model, buckets), batch_format="pyarrow",
        batch_size=1024, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers), num_cpus=1)
    rows.write_parquet(tmp.child("stage").path, filesystem=tmp.fs, partition_cols=["split", "bucket"])
    largest = 0
    for split in ("train", "eval"):
        # hive partitioning drops `split` and `bucket` from the files: mark_duplicates sets `split` again
        buckets_written = tmp.child("stage", f"split={split}").folders()
        stage = [paths for folder in buckets_written if (paths := [p.path for p in folder.files(".parquet")])]
        if stage:  # the rows a deduplication task will hold, from the Parquet footers
            largest = max(largest, *(pads.dataset(paths, filesystem=tmp.fs).count_rows() for paths in stage))
            ray.data.from_items([{"paths": paths} for paths in stage], override_num_blocks=len(stage)).map_batches(
                _dedup_bucket_files, batch_size=1, fn_args=(split, tmp.fs),
            ).write_parquet(tmp.child(f"dedup-{split}").path, filesystem=tmp.fs, partition_cols=["split"])
    return buckets, largest


def prepare(cfg: Config, tokenizer_path: str, out_dir: str | Path | Store, files: tuple[str, ...] | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or skip, when the published fingerprint matches) the preparation; returns the manifest."""

    from ropo_ray.train.model_io import load_tokenizer

    out = store(out_dir)
    inputs = resolve_inputs(files if files is not None else cfg.data.train_files, cfg.data)
    load_tokenizer(tokenizer_path, cfg.model)  # no chat template: a ConfigError now, not a failed actor later
    fingerprint = prepare_fingerprint(inputs, cfg, tokenizer_path)
    existing = read_manifest(out)
    if existing and existing.get("fingerprint") == fingerprint:
        log(f"prepare: up to date ({out}), skipped")
        return existing
    t0 = time.perf_counter()
    tmp = out.scratch()
    with max_block_bytes(BLOCK_BYTES):
        buckets, largest = _prepare_into(tmp, inputs, cfg, tokenizer_path)
    for split, sources in (("train", ["dedup-train/split=train"]), ("eval", ["dedup-eval/split=eval"]),
                           ("rejects", ["stage/split=rejected", "dedup-train/split=rejected",
                                        "dedup-eval/split=rejected"])):
        for k, src in enumerate(sources):
            _move_parts(tmp.child(*src.split("/")), tmp.child(split), f"part-{k}")
    for scratch in ("stage", "dedup-train", "dedup-eval"):
        tmp.child(scratch).remove()
    manifest = {"fingerprint": fingerprint, "inputs": [asdict(f) for f in inputs], "data": asdict(cfg.data),
                "tokenizer_path": str(tokenizer_path), "created": time.time(), **_summarise(tmp),
                "dedup": {"buckets": buckets, "largest_bucket_rows": largest}}
    tmp.child(MANIFEST).write_json(manifest)
    out.publish_from(tmp, MANIFEST)
    log(f"prepare: kept {manifest['kept']} ({manifest['train']} train / {manifest['eval']} eval), "
        f"rejected {manifest['rejected']} {manifest['rejected_by_reason']}, duplicates {manifest['duplicates']}, "
        f"tokens {manifest['tokens']} in {time.perf_counter() - t0:.1f} s -> {out}")
    return manifest
