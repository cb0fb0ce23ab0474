"""The reference-logprob cache on disk: a content key, Parquet parts and a manifest that is checked.

    <cache_root>/<key>/part-*.parquet   pair_id, ref_chosen_logps, ref_rejected_logps, chosen_tokens,
                                        rejected_tokens (float32 sums over completion tokens)
    <cache_root>/<key>/manifest.json    key fields, and per part: rows, bytes, sha256

The key hashes exactly what changes the numbers (DESIGN.md): the reference weights and config, the
tokenizer files (chat template included), truncation settings and dtype. Not beta, lr, block sizes,
adapter, seeds or the dataset: entries are found by pair_id, so datasets sharing pairs share entries
and a grown dataset computes only its new pairs. A manifest that does not match its files is a miss,
never a silent hit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ropo_ray.config.schema import DataConfig, ModelConfig
from ropo_ray.fingerprint import file_sha256, hash_json, model_fingerprint, tokenizer_fingerprint

MANIFEST = "manifest.json"
CACHE_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("ref_chosen_logps", pa.float32()), ("ref_rejected_logps", pa.float32()),
    ("chosen_tokens", pa.int32()), ("rejected_tokens", pa.int32()),
])


class CacheCorrupt(ValueError):
    """The cache's files do not match its manifest; the message names the file."""


def key_fields(model_dir: str | Path, tokenizer_dir: str | Path, data: DataConfig, model: ModelConfig
               ) -> dict[str, Any]:
    """The fields the key hashes, kept in the manifest so a miss can be explained."""
    return {
        "model": model_fingerprint(model_dir), "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "max_prompt_tokens": data.max_prompt_tokens, "max_completion_tokens": data.max_completion_tokens,
        "truncation": data.truncation, "dtype": model.dtype, "format": 1,
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hash_json(fields)[:32]


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def verify(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest, after checking every part's size, checksum and row count; CacheCorrupt otherwise."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise CacheCorrupt(f"{cache_dir}: no {MANIFEST}")
    listed = {p["name"] for p in manifest["parts"]}
    extra = sorted(p.name for p in cache_dir.glob("*.parquet") if p.name not in listed)
    if extra:
        raise CacheCorrupt(f"{cache_dir}: parts not in the manifest: {extra}")
    for part in manifest["parts"]:
        path = cache_dir / part["name"]
        if not path.is_file():
            raise CacheCorrupt(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != part["bytes"] or file_sha256(path) != part["sha256"]:
            raise CacheCorrupt(f"{path}: size or checksum differs from the manifest (altered after publishing)")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # an unreadable file is corruption whatever pyarrow calls it
            raise CacheCorrupt(f"{path}: unreadable ({err})") from err
        if rows != part["rows"]:
            raise CacheCorrupt(f"{path}: {rows} rows, manifest says {part['rows']}")
    return manifest


def cached_pair_ids(cache_dir: str | Path) -> set[str]:
    """pair_ids already in the cache (only that column is read)."""
    parts = sorted(Path(cache_dir).glob("*.parquet"))
    return {pid for p in parts for pid in pq.read_table(p, columns=["pair_id"])["pair_id"].to_pylist()}


def publish(cache_dir: str | Path, new_parts: list[Path], fields: dict[str, Any], covered: str | None = None
            ) -> dict[str, Any]:
    """Move finished parts into the cache and replace the manifest atomically (written last).

    `covered` names a prepared dataset (its fingerprint) all of whose pairs are now in the cache,
    so the next run over it is a hit without even a lookup.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cache_dir) or {"key": cache_key(fields), "fields": fields, "parts": [], "covered": []}
    if covered and covered not in manifest.setdefault("covered", []):
        manifest["covered"].append(covered)
    for src in new_parts:
        dst = cache_dir / src.name
        shutil.move(str(src), dst)
        manifest["parts"].append({"name": dst.name, "rows": pq.ParquetFile(dst).metadata.num_rows,
                                  "bytes": dst.stat().st_size, "sha256": file_sha256(dst)})
    manifest["rows"] = sum(p["rows"] for p in manifest["parts"])
    tmp = cache_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, cache_dir / MANIFEST)
    return manifest


def part_paths(cache_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The Parquet parts the manifest lists (never other files in the folder)."""
    return [str(Path(cache_dir) / p["name"]) for p in manifest["parts"]]


def read_entries(cache_dir: str | Path) -> pa.Table:
    """The whole verified cache as one table (for single-process use and tests; Ray reads it lazily)."""
    manifest = verify(cache_dir)
    tables = [pq.read_table(p) for p in part_paths(cache_dir, manifest)]
    return pa.concat_tables(tables) if tables else CACHE_SCHEMA.empty_table()
