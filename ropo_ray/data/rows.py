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
RAW_SCHEMA = pa.schema([("source", pa.string()), ("row_index", pa.int64()), ("raw", pa.binary()),
                        ("size", pa.int64())])
TOO_LARGE_PREFIX = 1024  # bytes of a row over data.max_row_bytes kept in rejects/ (the file and line name it)


def raw_text(raw: bytes) -> str:
    """The original row as text for the rejects set; undecodable bytes are kept as escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def rejected_row(source: str, row_index: int, raw: bytes, reason: str, detail: str) -> dict[str, Any]:
    return {"source": source, "row_index": row_index, "split": "rejected", "reason": reason, "detail": detail,
            "raw": raw_text(raw), "pair_id": "", "prompt_ids": [], "chosen_ids": [], "rejected_ids": [],
            "prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0}


def prepare_row(source: str, row_index: int, raw: bytes, tokenizer: Any, cfg: DataConfig,
                size: int | None = None) -> dict[str, Any]:
    """Parse, normalise, validate and tokenise one row; never raises for a bad row.

    `size` is the row's length in bytes when the reader kept only its start (`raw` is then a prefix).
    """
    size = len(raw) if size is None else size
    if size > cfg.max_row_bytes:
        return rejected_row(source, row_index, raw[:TOO_LARGE_PREFIX], "row_too_large",
                            f"row is {size} bytes, over data.max_row_bytes={cfg.max_row_bytes}; "
                            f"raw holds its first {min(size, TOO_LARGE_PREFIX)} bytes")
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


def iter_raw_rows(stream: Any, fmt: str, chunk_rows: int = 4096,
                  max_row_bytes: int = 1 << 20) -> Iterator[list[tuple[int, bytes, int]]]:
    """Chunks of (row_index, raw JSON bytes, row size in bytes) from an open pyarrow input stream of one file.

    JSONL: one row per non-blank line, row_index = 1-based line number, bytes kept as read (a bad
    line becomes a rejected row, never a failed read). Parquet / Arrow: each record serialised to
    JSON, row_index = 0-based record number. A row over `max_row_bytes` keeps only its first
    TOO_LARGE_PREFIX bytes (its size says so): a JSONL line's tail is skipped as it streams, so memory
    stays at one chunk of bounded rows whatever the file or line size.
    """
    if fmt == "jsonl":
        yield from _jsonl_chunks(stream, chunk_rows, max_row_bytes)
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(stream).iter_batches(batch_size=chunk_rows)
    else:
        batches = iter(pa.ipc.open_stream(stream))
    index = 0
    for batch in batches:
        rows = [json.dumps(r, ensure_ascii=False, default=str).encode() for r in batch.to_pylist()]
        yield [_bounded(index + i, r, len(r), max_row_bytes) for i, r in enumerate(rows)]
        index += len(rows)


def _bounded(index: int, raw: bytes, size: int, max_row_bytes: int) -> tuple[int, bytes, int]:
    return index, (raw if size <= max_row_bytes else raw[:TOO_LARGE_PREFIX]), size


def _jsonl_chunks(stream: Any, chunk_rows: int, max_row_bytes: int) -> Iterator[list[tuple[int, bytes, int]]]:
    chunk: list[tuple[int, bytes, int]] = []
    head, size = b"", 0  # the current line: its first max_row_bytes + 1 bytes, and its full length so far
    line_no = 0
    while block := stream.read(1 << 20):
        pieces = block.split(b"\n")
        for k, piece in enumerate(pieces):
            size += len(piece)
            if len(head) <= max_row_bytes:
                head = piece[: max_row_bytes + 1] if not head else head + piece[: max_row_bytes + 1 - len(head)]
            if k == len(pieces) - 1:  # the line goes on in the next block
                break
            line_no += 1
            if head.strip():
                chunk.append(_line(line_no, head, size, max_row_bytes))
            head, size = b"", 0
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    if head.strip():
        chunk.append(_line(line_no + 1, head, size, max_row_bytes))
    if chunk:
        yield chunk


def _line(line_no: int, head: bytes, size: int, max_row_bytes: int) -> tuple[int, bytes, int]:
    if size <= max_row_bytes:
        head = head.rstrip(b"\r")
        return line_no, head, len(head)
    return _bounded(line_no, head, size, max_row_bytes)
