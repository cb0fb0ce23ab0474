"""Folders that may be local paths or object-store URIs (s3://, gs://, abfs://, hdfs://, file://).

Every stage reads and writes its published outputs through `Store`, one code path for both, on
pyarrow's filesystems (the ones Ray Data and Ray Train use). A URI may carry pyarrow's options in its
query string, e.g. ``s3://bucket/run?region=eu-west-1`` or, for an S3-compatible server,
``s3://bucket/run?scheme=http&endpoint_override=10.0.0.5:9000``; credentials come from the
environment or the node's role, as pyarrow finds them.

Publishing is atomic for readers on both kinds of storage: a folder is trusted only through its
marker file (a manifest), which is always written last. Locally a finished folder is renamed into
place; on an object store, where a folder cannot be renamed, the files are moved one by one and
the marker last.

Model folders that must be on local disk (transformers, vLLM, safetensors memory maps) are
downloaded once into a local mirror (`Store.local_copy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.dataset as pads
import pyarrow.fs as pafs


def is_remote(location: str | Path) -> bool:
    """True for a URI with a scheme other than file:// (a Windows drive letter is not a scheme)."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): pyarrow's for a URI; the local one, with `~` expanded and the
    path made absolute, for a local path or a file:// URI."""
    location = str(location)
    if is_remote(location):
        return pafs.FileSystem.from_uri(location)
    local = location[len("file://"):] if location.startswith("file://") else location
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


class Store:
    """A folder on a local disk or in an object store: `Store("s3://b/run").child("data", "manifest.json")`."""

    def __init__(self, location: str | Path, _resolved: tuple[pafs.FileSystem, str] | None = None) -> None:
        self.location = str(location)
        self.fs, self.path = _resolved if _resolved is not None else resolve(self.location)

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.display()!r})"

    def __str__(self) -> str:
        return self.display()

    def display(self) -> str:
        """The location without credentials or options, for messages."""
        if not self.remote:
            return self.path
        parts = urlsplit(self.location)
        return f"{parts.scheme}://{self.path}"

    def child(self, *names: str) -> Store:
        """A file or folder inside this one (the URI's options are kept)."""
        path = "/".join([self.path.rstrip("/"), *names])
        if self.remote:
            parts = urlsplit(self.location)
            sub = "/".join([parts.path.rstrip("/"), *names])
            location = urlunsplit((parts.scheme, parts.netloc, sub, parts.query, ""))
        else:
            location = path
        return Store(location, (self.fs, path))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def parent(self) -> Store:
        path = self.path.rstrip("/").rsplit("/", 1)[0]
        if not self.remote:
            return Store(path, (self.fs, path))
        parts = urlsplit(self.location)
        sub = parts.path.rstrip("/").rsplit("/", 1)[0]
        return Store(urlunsplit((parts.scheme, parts.netloc, sub, parts.query, "")), (self.fs, path))

    def sibling(self, name: str) -> Store:
        return self.parent().child(name)

    # ---- queries ------------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return int(self._info().size)

    def files(self, suffix: str = "", recursive: bool = False) -> list[Store]:
        """The files in this folder ending with `suffix`, sorted by path; none when it does not exist."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        return [Store(self._location_of(i.path), (self.fs, i.path)) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File and i.path.endswith(suffix)]

    def folders(self) -> list[Store]:
        """The folders directly inside this one, sorted by path; none when it does not exist."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return [Store(self._location_of(i.path), (self.fs, i.path)) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.Directory]

    def _location_of(self, path: str) -> str:
        relative = path[len(self.path.rstrip("/")) + 1:]
        return self.child(*relative.split("/")).location

    def parquet_dataset(self) -> pads.Dataset | None:
        """The Parquet files directly in this folder as one pyarrow dataset; None when there are none."""
        parts = self.files(".parquet")
        return pads.dataset([p.path for p in parts], format="parquet", filesystem=self.fs) if parts else None

    def sha256(self, chunk: int = 1 << 22) -> str:
        """sha256 of the file's bytes, read in 4 MiB chunks."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    # ---- reading and writing ------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def read_json_if_exists(self) -> Any:
        return self.read_json() if self.is_file() else None

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: renamed into place locally, a single PUT on an object store,
        so a reader never sees half of it."""
        self.parent().makedirs()
        if self.remote:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        tmp = f"{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, value: Any) -> None:
        self.write_text(json.dumps(value, indent=2, default=str))

    def makedirs(self) -> None:
        if not self.remote:  # object stores have no folders to make
            self.fs.create_dir(self.path, recursive=True)

    def remove(self) -> None:
        """Delete this file or folder (nothing if it does not exist)."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def move_to(self, target: Store) -> None:
        """Move this file to `target` (a server-side copy and delete on object stores)."""
        target.parent().makedirs()
        self.fs.move(self.path, target.path)

    def copy_from(self, source: Store) -> None:
        """Copy a file or folder from any store here (a folder's files keep their relative paths;
        server-side within one object store)."""
        (self if source.is_dir() else self.parent()).makedirs()
        pafs.copy_files(source.path, self.path, source_filesystem=source.fs, destination_filesystem=self.fs)

    def upload(self, local: str | Path) -> None:
        """Copy a local file or folder here."""
        self.copy_from(Store(local))

    def append_lines(self, lines: list[str]) -> None:
        """Append lines in one write: in place locally; an object store rewrites the object (small logs only)."""
        text = "".join(line + "\n" for line in lines)
        if not self.remote:
            self.parent().makedirs()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        existing = self.read_text() if self.is_file() else ""
        self.write_text(existing + text)

    def download(self, local: str | Path) -> Path:
        """Copy this file or folder to a local path; returns it."""
        Store(local).copy_from(self)
        return Path(local)

    # ---- publishing ---------------------------------------------------------------------------------
    def scratch(self) -> Store:
        """A fresh sibling folder to build this one in before publishing it."""
        return self.sibling(f".{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def publish_from(self, scratch: Store, marker: str) -> None:
        """Replace this folder with the finished `scratch` folder; `marker` (the manifest) lands last.

        Locally one rename. On an object store: the old marker goes first (so the old folder stops
        being trusted), the old files are deleted, every other file is moved, then the marker.
        """
        if not self.remote:
            if self.exists():
                shutil.rmtree(self.path)
            os.rename(scratch.path, self.path)
            return
        self.child(marker).remove()
        self.remove()
        prefix = scratch.path.rstrip("/") + "/"
        for f in sorted(scratch.files(recursive=True), key=lambda f: f.path == prefix + marker):  # marker last
            f.move_to(self.child(*f.path[len(prefix):].split("/")))
        scratch.remove()

    def local_copy(self, mirror_root: str | Path, marker: str | None = None) -> Path:
        """This folder on local disk: itself when local; otherwise downloaded once into
        mirror_root/<hash of the location>/<name>, again only when its marker file changed."""
        if not self.remote:
            return Path(self.path)
        key = hashlib.sha256(self.display().encode()).hexdigest()[:16]
        local = Path(mirror_root) / key / self.name
        stamp = self.child(marker).read_text() if marker and self.child(marker).is_file() else None
        done = local.parent / f"{self.name}.downloaded"
        if local.is_dir() and done.is_file() and stamp is not None and done.read_text(encoding="utf-8") == stamp:
            return local
        shutil.rmtree(local, ignore_errors=True)
        self.download(local)
        if stamp is not None:
            done.write_text(stamp, encoding="utf-8")
        return local


def store(location: str | Path | Store) -> Store:
    return location if isinstance(location, Store) else Store(location)
