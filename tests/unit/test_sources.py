"""Input resolution (globs, folders, URIs, whole-file errors) and raw row reading."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ropo_ray.config.schema import DataConfig
from ropo_ray.data.rows import iter_raw_rows
from ropo_ray.data.sources import InputError, glob_match, resolve_inputs

CFG = DataConfig()
ROW = {"prompt": "Q", "chosen": "A", "rejected": "B"}


def test_glob_segments():
    assert glob_match("/d/a.jsonl", "/d/*.jsonl")
    assert not glob_match("/d/sub/a.jsonl", "/d/*.jsonl")  # * stays inside one folder
    assert glob_match("/d/sub/deeper/a.jsonl", "/d/**/*.jsonl")
    assert glob_match("/d/a.jsonl", "/d/**/*.jsonl")
    assert glob_match("/d/part-7.parquet", "/d/part-?.parquet")


def test_resolve_paths_globs_folders_and_file_uris(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl", "sub/c.jsonl"):
        (tmp_path / name).write_text(json.dumps(ROW) + "\n")
    pq.write_table(pa.Table.from_pylist([ROW]), tmp_path / "sub" / "d.parquet")
    files = resolve_inputs((f"file://{tmp_path}/*.jsonl", str(tmp_path / "sub"), str(tmp_path / "a.jsonl")), CFG)
    names = [f.uri.rsplit("/", 1)[-1] for f in files]
    assert names == ["a.jsonl", "b.jsonl", "c.jsonl", "d.parquet"]  # a.jsonl named twice, read once
    assert files[0].uri.startswith("file://") and [f.format for f in files][-1] == "parquet"


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d / "x.jsonl").write_text(""), "the file is empty"),
        (lambda d: (d / "x.csv").write_text("a,b"), "unknown format"),
        (lambda d: pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), d / "x.parquet"),
         "lack ['chosen', 'rejected']"),
        # a column type no row could use is one error naming the file and column, not a reject per row
        (lambda d: pq.write_table(pa.Table.from_pylist([{**ROW, "chosen": 7}]), d / "x.parquet"),
         "column 'chosen' is int64; expected a string or a list of {role, content} messages"),
        (lambda d: pq.write_table(pa.Table.from_pylist([{**ROW, "rejected": [1, 2]}]), d / "x.parquet"),
         "column 'rejected' is list<element: int64>"),
        (lambda d: pq.write_table(pa.table({"chosen": pa.array([None], pa.null()), "rejected": ["B"]}),
                                  d / "x.parquet"), "column 'chosen' is null"),
        (lambda d: _arrow_stream(pa.table({"chosen": [b"A"], "rejected": ["B"]}), d / "x.arrow"),
         "column 'chosen' is binary"),
    ],
)
def test_whole_file_problems_name_the_file(tmp_path, setup, fragment):
    setup(tmp_path)
    target = next(iter(tmp_path.iterdir()), tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
        resolve_inputs((str(target),), CFG)
    assert target.name in str(err.value)


def _arrow_stream(table, path):
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize(
    ("schema", "row", "fragment"),
    [
        ("messages", ROW, "column 'chosen' is string; expected a list of {role, content} messages"),
        ("prompt_chosen_rejected", {**ROW, "prompt": 3}, "column 'prompt' is int64; expected a string"),
        ("hh_rlhf", {"chosen": [{"role": "user", "content": "x"}], "rejected": "B"}, "expected a string"),
    ],
)
def test_column_types_follow_the_configured_schema(tmp_path, schema, row, fragment):
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=fragment.replace("{", r"\{").replace("}", r"\}")) as err:
        resolve_inputs((str(tmp_path / "x.parquet"),), DataConfig(schema=schema))
    assert str(tmp_path / "x.parquet") in str(err.value)


def test_usable_column_types_pass(tmp_path):
    """Strings (also dictionary-encoded), message lists, and in auto mode a non-string prompt (rows decide)."""
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": 1, "chosen": messages, "rejected": messages}]),
                   tmp_path / "m.parquet")
    strings = pa.table({"chosen": pa.array(["A"]).dictionary_encode(), "rejected": pa.array(["B"], pa.large_string())})
    pq.write_table(strings, tmp_path / "s.parquet")
    assert len(resolve_inputs((str(tmp_path),), CFG)) == 2


def test_missing_file_among_several_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    with pytest.raises(InputError, match="gone.jsonl does not exist"):
        resolve_inputs((str(tmp_path / "a.jsonl"), str(tmp_path / "gone.jsonl")), CFG)


def test_saved_dataset_dict_needs_a_split(tmp_path):
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train_prefs", "test_prefs"]}))
    with pytest.raises(InputError, match="train_prefs"):
        resolve_inputs((str(tmp_path),), CFG)


def test_jsonl_chunks_keep_line_numbers_and_bytes():
    data = b'{"a": 1}\r\n\n{"b": \xff}\n{"c": 3}'  # CRLF, a blank line, invalid UTF-8, no final newline
    chunks = list(iter_raw_rows(io.BytesIO(data), "jsonl", chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 1]
    assert [r for c in chunks for r in c] == [(1, b'{"a": 1}', 8), (3, b'{"b": \xff}', 8), (4, b'{"c": 3}', 8)]


def test_parquet_rows_become_json():
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([ROW, {**ROW, "prompt": "Q2"}]), buf)
    rows = [r for c in iter_raw_rows(pa.BufferReader(buf.getvalue()), "parquet") for r in c]
    assert [(i, json.loads(raw)) for i, raw, _ in rows] == [(0, ROW), (1, {**ROW, "prompt": "Q2"})]
