"""Content fingerprints: what a stage's output depends on, hashed, so a rerun can trust or rebuild it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys; tuples as lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file's bytes (Store.sha256: any filesystem)."""
    from ropo_ray.storage import Store

    return Store(path).sha256()


def files_fingerprint(folder: str | Path, names: tuple[str, ...] | None = None, pattern: str | None = None
                      ) -> dict[str, str]:
    """{file name: sha256} for the named files that exist, or the files matching `pattern`."""
    folder = Path(folder)
    paths = [folder / n for n in names or () if (folder / n).is_file()]
    if pattern:
        paths += sorted(folder.glob(pattern))
    return {p.name: file_sha256(p) for p in paths}


def tokenizer_fingerprint(path: str | Path) -> str:
    """Changes with the tokenizer's vocabulary, merges, special tokens or chat template."""
    return hash_json(files_fingerprint(path, TOKENIZER_FILES))


TRAINING_SECTIONS = ("model", "adapter", "loss", "train", "data")


def training_settings(cfg: Any) -> dict[str, Any]:
    """The config sections that change what a training run produces (not the sweep, eval or paths)."""
    from dataclasses import asdict

    return {k: asdict(getattr(cfg, k)) for k in TRAINING_SECTIONS}


def training_fingerprint(cfg: Any) -> str:
    return hash_json(training_settings(cfg))


def model_fingerprint(path: str | Path) -> str:
    """Changes with the model's weights (safetensors file hashes) or its config."""
    return hash_json(files_fingerprint(path, ("config.json",), "*.safetensors"))
