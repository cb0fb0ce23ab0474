"""Input files: resolve paths, folders, globs and URIs (pyarrow filesystems) to a checked file list.

Whole-file problems are found here, before any work starts, with an error naming the file: a
missing path, an empty file, an unknown format, a Parquet / Arrow file without the needed columns
or whose chosen / rejected column has a type no row could use (int64, a list of ints, all nulls),
a saved HF DatasetDict given without choosing a split. A column type is the same for every row of
the file, so such a file is one error, not thousands of identical rejects; a null or a bad value in
a column of a usable type is a per-row reject (ropo_ray.data.normalize).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ropo_ray.config.schema import DataConfig
from ropo_ray.storage import resolve

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


class InputError(ValueError):
    """An input path or file that cannot be read as preference data; the message names it."""


@dataclass(frozen=True)
class InputFile:
    """One readable input file."""

    path: str  # as pyarrow's filesystem names it
    uri: str  # as the user can read it back (URI or local path)
    format: str  # jsonl | parquet | arrow
    size: int
    mtime_ns: int


def filesystem_of(spec: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, scheme prefix for display)."""
    fs, path = resolve(spec)
    return fs, path, spec.split("://", 1)[0] + "://" if "://" in spec else ""


def _format_of(path: str) -> str | None:
    for ext, fmt in FORMATS.items():
        if path.endswith(ext):
            return fmt
    return None


def _hf_saved_files(fs: pafs.FileSystem, folder: str, shown: str) -> list[str] | None:
    """The .arrow files of a `datasets` save_to_disk folder, or None if it is not one."""
    def exists(name: str) -> bool:
        return fs.get_file_info(f"{folder}/{name}").type == pafs.FileType.File

    if exists("dataset_dict.json"):
        with fs.open_input_stream(f"{folder}/dataset_dict.json") as f:
            splits = json.loads(f.read()).get("splits", [])
        raise InputError(f"{shown} is a saved DatasetDict; name one split folder, e.g. {shown}/{splits[0]}"
                         if splits else f"{shown} is a saved DatasetDict with no splits")
    if not exists("state.json"):
        return None
    with fs.open_input_stream(f"{folder}/state.json") as f:
        state = json.loads(f.read())
    return [f"{folder}/{item['filename']}" for item in state.get("_data_files", [])]


def glob_match(path: str, pattern: str) -> bool:
    """Shell-style match on path segments: `*`, `?`, `[..]` stay inside one segment, `**` spans any number."""
    def match(parts: list[str], pats: list[str]) -> bool:
        if not pats:
            return not parts
        if pats[0] == "**":
            return any(match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and match(parts[1:], pats[1:])

    return match(path.strip("/").split("/"), pattern.strip("/").split("/"))


def _expand(spec: str) -> list[tuple[pafs.FileSystem, str, str]]:
    fs, path, scheme = filesystem_of(spec)
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File and glob_match(i.path, path))
        if not found:
            raise InputError(f"data.train_files: {spec} matches no file")
        return [(fs, p, scheme) for p in found]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"data.train_files: {spec} does not exist")
    if info.type == pafs.FileType.Directory:
        hf = _hf_saved_files(fs, path, spec)
        if hf is not None:
            return [(fs, p, scheme) for p in hf]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File and _format_of(i.path))
        if not found:
            raise InputError(f"data.train_files: folder {spec} holds no .jsonl, .json, .parquet or .arrow file")
        return [(fs, p, scheme) for p in found]
    return [(fs, path, scheme)]


def _schema(fs: pafs.FileSystem, path: str, fmt: str) -> pa.Schema | None:
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            return pq.read_schema(f)
    if fmt == "arrow":
        with fs.open_input_stream(path) as f:
            return pa.ipc.open_stream(f).schema
    return None


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_messages(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)


_KINDS = {_is_text: "a string", _is_messages: "a list of {role, content} messages"}


def _check_types(schema: pa.Schema, shown: str, cfg: DataConfig) -> None:
    """Refuse a chosen / rejected (or, for schema prompt_chosen_rejected, prompt) column of a type that
    no row could use: strings for two schemas, lists of message structs for the third."""
    wanted = {"auto": (_is_text, _is_messages), "messages": (_is_messages,)}.get(cfg.schema, (_is_text,))
    checks = {cfg.chosen_column: wanted, cfg.rejected_column: wanted}
    if cfg.schema == "prompt_chosen_rejected" and cfg.prompt_column in schema.names:
        checks[cfg.prompt_column] = (_is_text,)
    for name, kinds in checks.items():
        t = schema.field(name).type
        if not any(is_kind(t) for is_kind in kinds):
            raise InputError(f"{shown}: column '{name}' is {t}; expected {' or '.join(_KINDS[k] for k in kinds)} "
                             f"(data.schema={cfg.schema})")


def resolve_inputs(specs: tuple[str, ...], cfg: DataConfig) -> list[InputFile]:
    """Every input file, checked; raises InputError naming the first file that cannot be used."""
    files: list[InputFile] = []
    seen: set[str] = set()
    for spec in specs:
        for fs, path, scheme in _expand(spec):
            shown = f"{scheme}{path}" if scheme else path
            identity = f"{fs.type_name}:{path}"
            if identity in seen:  # named twice (say, by a glob and by its path): read once
                continue
            seen.add(identity)
            fmt = _format_of(path)
            if fmt is None:
                raise InputError(f"{shown}: unknown format (expected .jsonl, .json, .parquet or .arrow)")
            info = fs.get_file_info(path)
            if info.size == 0:
                raise InputError(f"{shown}: the file is empty")
            schema = _schema(fs, path, fmt)
            needed = [cfg.chosen_column, cfg.rejected_column]
            if schema is not None and any(c not in schema.names for c in needed):
                raise InputError(f"{shown}: columns {schema.names} lack {[c for c in needed if c not in schema.names]} "
                                 "(set data.chosen_column / data.rejected_column if they are named otherwise)")
            if schema is not None:
                _check_types(schema, shown, cfg)
            files.append(InputFile(path, shown, fmt, info.size, info.mtime_ns or 0))
    return files


def inputs_fingerprint(files: list[InputFile]) -> str:
    """Changes when a file is added, removed, resized or touched."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.uri):
        h.update(f"{f.uri}|{f.size}|{f.mtime_ns}\n".encode())
    return h.hexdigest()
