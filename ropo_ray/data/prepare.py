"""`ropo-ray prepare`: preference files -> validated, tokenised, deduplicated Parquet, on Ray Data.

    read (one task per file, streamed in chunks) -> parse / normalise / validate / tokenise
    (an actor pool holding the tokenizer) -> stage/ partitioned by split
    -> kept rows hash-partitioned by pair_id, duplicates marked -> train/, eval/, rejects/
    -> manifest.json (counts, fingerprint), published by moving the finished folder into place.

The output folder may be local or an object-store URI (ropo_ray.storage): Ray Data's tasks write
and read it through the same pyarrow filesystem on whichever node they run.

Memory stays bounded whatever the input size: files are read in chunks, every step streams, and
the deduplication is a hash shuffle that Ray Data spills to disk.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ropo_ray.config.schema import Config, DataConfig, ModelConfig
from ropo_ray.data.rows import RAW_SCHEMA, ROW_SCHEMA, iter_raw_rows, prepare_row, rejected_row
from ropo_ray.data.sources import InputFile, filesystem_of, inputs_fingerprint, resolve_inputs
from ropo_ray.fingerprint import hash_json, tokenizer_fingerprint
from ropo_ray.storage import Store, store

MANIFEST = "manifest.json"
DEDUP_ROWS_PER_PARTITION = 50_000
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

    def __init__(self, tokenizer_path: str, data_cfg: DataConfig, model_cfg: ModelConfig) -> None:
        from ropo_ray.train.model_io import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, model_cfg)
        self.cfg = data_cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [prepare_row(s, int(i), r, self.tokenizer, self.cfg, int(n)) for s, i, r, n in
                zip(batch["source"].to_pylist(), batch["row_index"].to_pylist(), batch["raw"].to_pylist(),
                    batch["size"].to_pylist())]
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def mark_duplicates(block: pa.Table, split: str) -> pa.Table:
    """Within a hash partition by pair_id: the first row (by source, row_index) of each pair_id stays in
    `split`, the others become rejects with reason duplicate_pair naming the kept row."""
    rows = sorted(block.to_pylist(), key=lambda r: (r["pair_id"], r["source"], r["row_index"]))
    out, first = [], None
    for r in rows:
        if first is not None and r["pair_id"] == first["pair_id"]:
            detail = f"same pair as {first['source']} row {first['row_index']}"
            r = rejected_row(r["source"], r["row_index"], r["raw"].encode(), "duplicate_pair", detail)
        else:
            first = r
            r = {**r, "split": split}
        out.append(r)
    return pa.Table.from_pylist(out, schema=ROW_SCHEMA)


def prepare_fingerprint(files: list[InputFile], cfg: Config, tokenizer_path: str) -> str:
    """Everything the prepared data depends on: inputs, data settings, tokenizer and chat template."""
    return hash_json({"inputs": inputs_fingerprint(files), "data": asdict(cfg.data),
                      "tokenizer": tokenizer_fingerprint(tokenizer_path), "format": 1})


def read_manifest(out_dir: str | Path | Store) -> dict | None:
    return store(out_dir).child(MANIFEST).read_json_if_exists()


def _count(folder: Store, columns: list[str] | None = None) -> pa.Table | int:
    dataset = folder.parquet_dataset()
    if dataset is None:
        return 0 if columns is None else pa.table({c: [] for c in columns})
    return dataset.count_rows() if columns is None else dataset.to_table(columns=columns)


def _summarise(out: Store) -> dict[str, Any]:
    rejects = _count(out.child("rejects"), ["reason"])
    reasons = Counter(rejects["reason"].to_pylist()) if rejects.num_rows else Counter()
    duplicates = reasons.pop("duplicate_pair", 0)
    tokens = {}
    for split in ("train", "eval"):
        t = _count(out.child(split), ["prompt_tokens", "chosen_tokens", "rejected_tokens"])
        tokens[split] = {c: int(pc.sum(t[c]).as_py() or 0) for c in t.column_names} if t.num_rows else {}
    train, evals = _count(out.child("train")), _count(out.child("eval"))
    return {"kept": train + evals, "train": train, "eval": evals, "rejected": sum(reasons.values()),
            "duplicates": duplicates, "rejected_by_reason": dict(sorted(reasons.items())), "tokens": tokens}


def _move_parts(src: Store, dst: Store, prefix: str) -> None:
    dst.makedirs()
    for i, part in enumerate(src.files(".parquet", recursive=True)):
        part.move_to(dst.child(f"{prefix}-{i:05d}.parquet"))


def prepare(cfg: Config, tokenizer_path: str, out_dir: str | Path | Store, files: tuple[str, ...] | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or skip, when the published fingerprint matches) the preparation; returns the manifest."""
    import ray

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
    # tokenizer actors, leaving a CPU for the read and write tasks that feed and drain them
    workers = max(1, min(len(inputs), int(ray.cluster_resources().get("CPU", 1)) - 1))
    raw = ray.data.from_items([{"uri": f.uri, "format": f.format} for f in inputs], override_num_blocks=len(inputs))
    read = raw.map_batches(_read_files, batch_size=1, fn_kwargs={"max_row_bytes": cfg.data.max_row_bytes})
    rows = read.map_batches(
        RowPreparer, fn_constructor_args=(tokenizer_path, cfg.data, cfg.model), batch_format="pyarrow",
        batch_size=1024, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers), num_cpus=1)
    rows.write_parquet(tmp.child("stage").path, filesystem=tmp.fs, partition_cols=["split"])
    for split in ("train", "eval"):
        stage = tmp.child("stage", f"split={split}").files(".parquet")
        if stage:  # hive partitioning drops `split` from the files: mark_duplicates sets it again
            kept = ray.data.read_parquet([p.path for p in stage], filesystem=tmp.fs, partitioning=None)
            # mark_duplicates holds one partition at a time: size partitions by rows, so memory stays
            # bounded however large the input (the row count comes from the Parquet footers).
            parts = max(workers * 4, math.ceil(kept.count() / DEDUP_ROWS_PER_PARTITION))
            kept.repartition(parts, keys=["pair_id"]).map_batches(
                mark_duplicates, fn_args=(split,), batch_format="pyarrow", batch_size=None,
            ).write_parquet(tmp.child(f"dedup-{split}").path, filesystem=tmp.fs, partition_cols=["split"])
    for split, sources in (("train", ["dedup-train/split=train"]), ("eval", ["dedup-eval/split=eval"]),
                           ("rejects", ["stage/split=rejected", "dedup-train/split=rejected",
                                        "dedup-eval/split=rejected"])):
        for k, src in enumerate(sources):
            _move_parts(tmp.child(*src.split("/")), tmp.child(split), f"part-{k}")
    for scratch in ("stage", "dedup-train", "dedup-eval"):
        tmp.child(scratch).remove()
    manifest = {"fingerprint": fingerprint, "inputs": [asdict(f) for f in inputs], "data": asdict(cfg.data),
                "tokenizer_path": str(tokenizer_path), "created": time.time(), **_summarise(tmp)}
    tmp.child(MANIFEST).write_json(manifest)
    out.publish_from(tmp, MANIFEST)
    log(f"prepare: kept {manifest['kept']} ({manifest['train']} train / {manifest['eval']} eval), "
        f"rejected {manifest['rejected']} {manifest['rejected_by_reason']}, duplicates {manifest['duplicates']}, "
        f"tokens {manifest['tokens']} in {time.perf_counter() - t0:.1f} s -> {out}")
    return manifest
