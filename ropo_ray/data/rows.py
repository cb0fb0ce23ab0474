"""One raw input row -> one output row: kept (tokenised, with pair_id and split) or rejected (with reason).

Pure functions over plain Python values. Every input row yields exactly one output row, so
input rows = kept + rejected (+ duplicates, found later across rows) holds by construction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from ropo_ray.config.schema import DataConfig
from ropo_ray.data.normalize import RowError, normalize_row, parse_json_line
from ropo_ray.data.pairs import PairTooLong, is_eval_pair, tokenize_pair

# The schema of every prepared row (kept and rejected alike), so every Parquet part agrees.
ROW_SCHEMA = pa.schema([
    ("source", pa.string()), ("row_index", pa.int64()), ("split", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("raw", pa.string()), ("pair_id", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())), ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())), ("prompt_tokens", pa.int32()), ("chosen_tokens", pa.int32()),
    ("rejected_tokens", pa.int32()),
])
RAW_SCHEMA = pa.schema([("source", pa.string()), ("row_index", pa.int64()), ("raw", pa.binary())])


def raw_text(raw: bytes) -> str:
    """The original row as text for the rejects set; undecodable bytes are kept as escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def rejected_row(source: str, row_index: int, raw: bytes, reason: str, detail: str) -> dict[str, Any]:
    return {"source": source, "row_index": row_index, "split": "rejected", "reason": reason, "detail": detail,
            "raw": raw_text(raw), "pair_id": "", "prompt_ids": [], "chosen_ids": [], "rejected_ids": [],
            "prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0}


def prepare_row(source: str, row_index: int, raw: bytes, tokenizer: Any, cfg: DataConfig) -> dict[str, Any]:
    """Parse, normalise, validate and tokenise one row; never raises for a bad row."""
    try:
        pair = normalize_row(parse_json_line(raw), cfg)
        tokens = tokenize_pair(tokenizer, pair["messages"], pair["chosen"], pair["rejected"], cfg)
    except RowError as err:
        return rejected_row(source, row_index, raw, err.reason, err.detail)
    except PairTooLong as err:
        return rejected_row(source, row_index, raw, "too_long", str(err))
    split = "eval" if is_eval_pair(tokens["pair_id"], cfg.eval_fraction) else "train"
    return {"source": source, "row_index": row_index, "split": split, "reason": "", "detail": "",
            "raw": raw_text(raw), **tokens, "prompt_tokens": len(tokens["prompt_ids"]),
            "chosen_tokens": len(tokens["chosen_ids"]), "rejected_tokens": len(tokens["rejected_ids"])}


def iter_raw_rows(stream: Any, fmt: str, chunk_rows: int = 4096) -> Iterator[list[tuple[int, bytes]]]:
    """Chunks of (row_index, raw JSON bytes) from an open pyarrow input stream of one file.

    JSONL: one row per non-blank line, row_index = 1-based line number, bytes kept as read (a bad
    line becomes a rejected row, never a failed read). Parquet / Arrow: each record serialised to
    JSON, row_index = 0-based record number. Memory stays at one chunk whatever the file size.
    """
    if fmt == "jsonl":
        yield from _jsonl_chunks(stream, chunk_rows)
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(stream).iter_batches(batch_size=chunk_rows)
    else:
        batches = iter(pa.ipc.open_stream(stream))
    index = 0
    for batch in batches:
        rows = batch.to_pylist()
        yield [(index + i, json.dumps(r, ensure_ascii=False, default=str).encode()) for i, r in enumerate(rows)]
        index += len(rows)


def _jsonl_chunks(stream: Any, chunk_rows: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    pending = b""
    line_no = 0
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for line in lines:
            line_no += 1
            if line.strip():
                chunk.append((line_no, line.rstrip(b"\r")))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    if pending.strip():
        chunk.append((line_no + 1, pending.rstrip(b"\r")))
    if chunk:
        yield chunk
