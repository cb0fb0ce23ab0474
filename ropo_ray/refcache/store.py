"""The reference-logprob cache on disk: a content key, Parquet parts and a manifest that is checked.

    <cache_root>/<key>/part-*.parquet   pair_id, ref_chosen_logps, ref_rejected_logps, chosen_tokens,
                                        rejected_tokens (float32 sums over completion tokens)
    <cache_root>/<key>/manifest.json    key fields, and per part: rows, bytes, sha256

The key hashes exactly what changes the numbers (DESIGN.md): the reference weights and config, the
tokenizer files (chat template included), truncation settings and dtype. Not beta, lr, block sizes,
adapter, seeds or the dataset: entries are found by pair_id, so datasets sharing pairs share entries
and a grown dataset computes only its new pairs. A manifest that does not match its files is a miss,
never a silent hit. The cache root may be local or an object-store URI (ropo_ray.storage).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ropo_ray.config.schema import DataConfig, ModelConfig
from ropo_ray.fingerprint import file_sha256, hash_json, model_fingerprint, tokenizer_fingerprint
from ropo_ray.storage import Store, store

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


def read_manifest(cache_dir: str | Path | Store) -> dict[str, Any] | None:
    return store(cache_dir).child(MANIFEST).read_json_if_exists()


def verify(cache_dir: str | Path | Store) -> dict[str, Any]:
    """The manifest, after checking every part's size, checksum and row count; CacheCorrupt otherwise."""
    cache_dir = store(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise CacheCorrupt(f"{cache_dir}: no {MANIFEST}")
    listed = {p["name"] for p in manifest["parts"]}
    extra = sorted(p.name for p in cache_dir.files(".parquet") if p.name not in listed)
    if extra:
        raise CacheCorrupt(f"{cache_dir}: parts not in the manifest: {extra}")
    for part in manifest["parts"]:
        path = cache_dir.child(part["name"])
        if not path.is_file():
            raise CacheCorrupt(f"{path}: listed in the manifest but missing")
        if path.size() != part["bytes"] or path.sha256() != part["sha256"]:
            raise CacheCorrupt(f"{path}: size or checksum differs from the manifest (altered after publishing)")
        try:
            rows = _parquet_rows(path)
        except Exception as err:  # an unreadable file is corruption whatever pyarrow calls it
            raise CacheCorrupt(f"{path}: unreadable ({err})") from err
        if rows != part["rows"]:
            raise CacheCorrupt(f"{path}: {rows} rows, manifest says {part['rows']}")
    return manifest


def _parquet_rows(part: Store) -> int:
    with part.fs.open_input_file(part.path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def publish(cache_dir: str | Path | Store, new_parts: list[Path], fields: dict[str, Any], covered: str | None = None
            ) -> dict[str, Any]:
    """Move finished local parts into the cache, then replace the manifest (written last, whole).

    `covered` names a prepared dataset (its fingerprint) all of whose pairs are now in the cache,
    so the next run over it is a hit without even a lookup.
    """
    cache_dir = store(cache_dir)
    cache_dir.makedirs()
    manifest = read_manifest(cache_dir) or {"key": cache_key(fields), "fields": fields, "parts": [], "covered": []}
    if covered and covered not in manifest.setdefault("covered", []):
        manifest["covered"].append(covered)
    for src in new_parts:
        entry = {"name": src.name, "rows": pq.ParquetFile(src).metadata.num_rows, "bytes": src.stat().st_size,
                 "sha256": file_sha256(src)}
        dst = cache_dir.child(src.name)
        if cache_dir.remote:
            dst.upload(src)
            src.unlink()
        else:
            shutil.move(str(src), dst.path)
        manifest["parts"].append(entry)
    manifest["rows"] = sum(p["rows"] for p in manifest["parts"])
    cache_dir.child(MANIFEST).write_json(manifest)
    return manifest


def part_paths(cache_dir: str | Path | Store, manifest: dict[str, Any]) -> list[str]:
    """The Parquet parts the manifest lists (never other files in the folder), as paths on the cache's
    filesystem (`store(cache_dir).fs`)."""
    folder = store(cache_dir)
    return [folder.child(p["name"]).path for p in manifest["parts"]]


def read_entries(cache_dir: str | Path | Store) -> pa.Table:
    """The whole verified cache as one table (for single-process use and tests; Ray reads it lazily)."""
    cache_dir = store(cache_dir)
    manifest = verify(cache_dir)
    tables = [pq.read_table(p, filesystem=cache_dir.fs) for p in part_paths(cache_dir, manifest)]
    return pa.concat_tables(tables) if tables else CACHE_SCHEMA.empty_table()
