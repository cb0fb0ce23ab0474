"""Store: the same folder operations on a local disk and on an S3 bucket (a local S3 server)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ropo_ray.storage import Store, is_remote


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "run")
    return Store(request.getfixturevalue("s3_server")())


def test_is_remote():
    assert is_remote("s3://b/k") and is_remote("gs://b/k") and is_remote("abfs://c@a.dfs.core.windows.net/p")
    assert not is_remote("/tmp/x") and not is_remote("runs/x") and not is_remote("file:///tmp/x")
    assert not is_remote("C:/data/x")  # a drive letter is not a scheme


def test_write_read_list_and_remove(root):
    root.child("data", "a.json").write_json({"x": 1})
    root.child("data", "b.parquet").write_bytes(b"12345")
    root.child("data", "sub", "c.parquet").write_text("abc")
    assert root.child("data", "a.json").read_json() == {"x": 1}
    assert root.child("data").is_dir() and root.child("data", "a.json").is_file()
    assert not root.child("nothing").exists() and root.child("nothing").read_json_if_exists() is None
    assert [f.name for f in root.child("data").files(".parquet")] == ["b.parquet"]
    assert [f.name for f in root.child("data").files(".parquet", recursive=True)] == ["b.parquet", "c.parquet"]
    assert root.child("data", "b.parquet").size() == 5
    assert root.child("data", "b.parquet").sha256() == hashlib.sha256(b"12345").hexdigest()
    assert [f.name for f in root.child("data").folders()] == ["sub"] and root.child("nothing").folders() == []
    listed = root.child("data").files(".parquet", recursive=True)[1]
    assert listed.read_text() == "abc"  # a listed file keeps the URI's options (endpoint, credentials)
    root.child("data", "sub").remove()
    assert not root.child("data", "sub", "c.parquet").exists() and root.child("data", "a.json").exists()
    root.child("log.jsonl").append_lines(["1"])
    root.child("log.jsonl").append_lines(["2", "3"])
    assert root.child("log.jsonl").read_text() == "1\n2\n3\n"


def test_publish_replaces_the_folder_with_the_marker_last(root):
    out = root.child("data")
    out.child("old.parquet").write_text("old")
    out.child("manifest.json").write_json({"v": 1})
    scratch = out.scratch()
    scratch.child("train", "part-0.parquet").write_text("new")
    scratch.child("manifest.json").write_json({"v": 2})
    out.publish_from(scratch, "manifest.json")
    assert out.child("manifest.json").read_json() == {"v": 2}
    assert [f.path[len(out.path) + 1:] for f in out.files(recursive=True)] == ["manifest.json", "train/part-0.parquet"]
    assert not scratch.exists()


def test_upload_download_and_local_copy(root, tmp_path):
    src = tmp_path / "src"
    (src / "merged").mkdir(parents=True)
    (src / "merged" / "w.bin").write_bytes(b"w" * 10)
    (src / "run.json").write_text('{"step": 1}')
    root.child("model").upload(src)
    assert root.child("model", "merged", "w.bin").size() == 10
    local = root.child("model").local_copy(tmp_path / "mirror", marker="run.json")
    assert (local / "merged" / "w.bin").read_bytes() == b"w" * 10
    if root.remote:  # downloaded once; a changed marker downloads again
        (local / "merged" / "w.bin").write_bytes(b"stale")
        assert root.child("model").local_copy(tmp_path / "mirror", marker="run.json") == local
        assert (local / "merged" / "w.bin").read_bytes() == b"stale"
        root.child("model", "run.json").write_text('{"step": 2}')
        again = root.child("model").local_copy(tmp_path / "mirror", marker="run.json")
        assert (again / "merged" / "w.bin").read_bytes() == b"w" * 10
    else:
        assert local == Path(root.child("model").path)
    back = root.child("model", "run.json").download(tmp_path / "back" / "run.json")
    assert back.read_text() in ('{"step": 1}', '{"step": 2}')


def test_display_hides_credentials_and_options(s3_server):
    s = Store(s3_server()).child("data")
    assert s.display().startswith("s3://ropo-") and s.display().endswith("/run/data")
    assert "test:test" not in str(s) and "endpoint_override" not in str(s)
    assert "endpoint_override" in s.location and s.sibling("cache").location.split("?")[0].endswith("/run/cache")


def test_parquet_dataset_reads_the_folders_parts(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root.child("split")
    assert folder.parquet_dataset() is None
    for i, rows in enumerate(([1, 2], [3])):
        folder.makedirs()
        pq.write_table(pa.table({"x": rows}), folder.child(f"part-{i}.parquet").path, filesystem=folder.fs)
    folder.child("manifest.json").write_json({})  # not a part
    dataset = folder.parquet_dataset()
    assert dataset.count_rows() == 3 and sorted(dataset.to_table()["x"].to_pylist()) == [1, 2, 3]
