"""Integrity records of Ray Train checkpoints and of the published export: sizes and sha256, written last.

A checkpoint is written by every rank into its own temporary folder and uploaded by Ray Train into
one shared checkpoint folder. Each rank adds `integrity-rank-<r>.json` (its files' sizes and sha256,
and the world size) as the last file of its part. Before a run resumes, the driver checks the
checkpoint Ray Train will resume from (the latest one of its checkpoint-manager snapshot): every
rank's record present and every listed file with its recorded size and checksum. A checkpoint that
fails is refused with `CheckpointCorrupt` naming the file, before any worker starts: resuming from
it would load altered weights or optimizer state, and silently falling back to an older checkpoint
would mean editing Ray Train's snapshot. The message says how to start over.

The export in <run_dir>/model lists its files the same way in run.json (written last); an export
that no longer matches is not trusted: the run is resumed from its final checkpoint, which exports
it again (no step is trained twice).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ropo_ray.storage import Store, store

RECORD_PREFIX = "integrity-rank-"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


class CheckpointCorrupt(ValueError):
    """A checkpoint's or an export's files differ from their integrity record; the message names the file."""


def file_records(folder: str | Path | Store, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` (records and `skip` excluded)."""
    folder = store(folder)
    prefix = folder.path.rstrip("/") + "/"
    out = {}
    for f in folder.files(recursive=True):
        relative = f.path[len(prefix):]
        if relative.rsplit("/", 1)[-1].startswith(RECORD_PREFIX) or relative in skip:
            continue
        out[relative] = {"bytes": f.size(), "sha256": f.sha256()}
    return out


def check_files(folder: str | Path | Store, files: dict[str, dict[str, Any]], what: str) -> None:
    """Every listed file exists under `folder` with its recorded size and sha256; CheckpointCorrupt otherwise."""
    folder = store(folder)
    for relative, record in sorted(files.items()):
        path = folder.child(*relative.split("/"))
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: listed in the {what}'s integrity record but missing")
        if path.size() != record["bytes"]:
            raise CheckpointCorrupt(f"{path}: {path.size()} bytes, the {what}'s integrity record says "
                                    f"{record['bytes']} (truncated or altered after it was written)")
        if path.sha256() != record["sha256"]:
            raise CheckpointCorrupt(f"{path}: sha256 differs from the {what}'s integrity record "
                                    "(altered after it was written)")


def write_record(folder: Path, rank: int, world_size: int) -> None:
    """Rank `rank`'s record of the files it wrote into its checkpoint folder; call it last, just before
    `ray.train.report`."""
    record = {"rank": rank, "world_size": world_size, "files": file_records(folder)}
    (Path(folder) / f"{RECORD_PREFIX}{rank}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def verify_checkpoint(folder: str | Path | Store) -> None:
    """Every rank's record is present and every file it lists matches; CheckpointCorrupt otherwise."""
    folder = store(folder)
    records = {}
    for f in folder.files(".json"):
        match = re.fullmatch(re.escape(RECORD_PREFIX) + r"(\d+)\.json", f.name)
        if match:
            records[int(match.group(1))] = f.read_json()
    if not records:
        raise CheckpointCorrupt(f"{folder}: no integrity record ({RECORD_PREFIX}<rank>.json); not a complete "
                                "checkpoint of this version")
    world = max(r["world_size"] for r in records.values())
    missing = sorted(set(range(world)) - set(records))
    if missing:
        raise CheckpointCorrupt(f"{folder}: integrity records of rank(s) {missing} missing (of {world})")
    for rank in sorted(records):
        check_files(folder, records[rank]["files"], "checkpoint")


def resume_checkpoint(run_storage: str | Path | Store) -> Store | None:
    """The checkpoint Ray Train resumes run storage `run_storage` (<run_dir>/ray/<name>) from: the latest
    one of its snapshot; None when the run has none."""
    run_storage = store(run_storage)
    snapshot = run_storage.child(SNAPSHOT).read_json_if_exists()
    latest = (snapshot or {}).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return run_storage.child(name) if name else None


def verify_resume_checkpoint(run_storage: str | Path | Store, log: Any = print) -> None:
    """Refuse to resume from a checkpoint whose files differ from their record (see the module docstring)."""
    checkpoint = resume_checkpoint(run_storage)
    if checkpoint is None:
        return
    try:
        verify_checkpoint(checkpoint)
    except CheckpointCorrupt as err:
        raise CheckpointCorrupt(f"{err}. Refusing to resume from {checkpoint}; to start this run over, delete "
                                f"{store(run_storage)}") from None
    log(f"train: resuming from {checkpoint.name} (files match their integrity records)")
