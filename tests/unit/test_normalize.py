"""Row normalisation and validation: every schema, every rejection reason, on hand-made rows."""

from __future__ import annotations

import pytest

from ropo_ray.config.schema import DataConfig
from ropo_ray.data.normalize import REASONS, RowError, normalize_row, parse_json_line
from ropo_ray.data.rows import iter_raw_rows, prepare_row

CFG = DataConfig()
USER = {"role": "user", "content": "What is 2 + 2?"}


def test_prompt_chosen_rejected():
    out = normalize_row({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}, CFG)
    assert out == {"messages": [{"role": "user", "content": "Hi?"}], "chosen": "Hello!", "rejected": "Go away.",
                   "schema": "prompt_chosen_rejected"}


def test_messages_schema_takes_prompt_turns_from_the_lists():
    row = {"prompt": "ignored", "chosen": [USER, {"role": "assistant", "content": "4"}],
           "rejected": [USER, {"role": "assistant", "content": "5"}]}
    out = normalize_row(row, CFG)
    assert out["messages"] == [USER] and out["chosen"] == "4" and out["rejected"] == "5"
    assert out["schema"] == "messages"


def test_hh_rlhf_transcripts_split_at_last_assistant_turn():
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: Tell me a joke"
    row = {"chosen": prefix + "\n\nAssistant: Why did the chicken cross the road?",
           "rejected": prefix + "\n\nAssistant: No."}
    out = normalize_row(row, CFG)
    assert out["messages"] == [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello, how can I help?"},
                               {"role": "user", "content": "Tell me a joke"}]
    assert out["chosen"] == "Why did the chicken cross the road?" and out["rejected"] == "No."


def test_custom_column_names():
    cfg = DataConfig(prompt_column="question", chosen_column="good", rejected_column="bad")
    out = normalize_row({"question": "Q", "good": "A", "bad": "B"}, cfg)
    assert out["chosen"] == "A" and out["messages"][0]["content"] == "Q"


BAD_ROWS = [
    ({"prompt": "Q", "chosen": "A"}, "missing_field"),
    ({"prompt": "Q", "chosen": None, "rejected": "B"}, "missing_field"),
    ({"prompt": "Q", "chosen": 3, "rejected": "B"}, "wrong_type"),
    ({"prompt": "   ", "chosen": "A", "rejected": "B"}, "empty_prompt"),
    ({"prompt": "Q", "chosen": "", "rejected": "B"}, "empty_response"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same "}, "identical_responses"),
    ({"prompt": "Q", "chosen": "bad \ufffd text", "rejected": "B"}, "undecodable_text"),
    ({"chosen": [USER, {"role": "assistant"}], "rejected": [USER, {"role": "assistant", "content": "5"}]},
     "malformed_messages"),
    ({"chosen": [{"role": "wizard", "content": "x"}], "rejected": [USER]}, "unknown_role"),
    ({"chosen": [USER], "rejected": [USER]}, "no_assistant_turn"),
    ({"chosen": [USER, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "5"}]}, "prompt_mismatch"),
    ({"chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
     "empty_prompt"),
    ({"chosen": "just text", "rejected": "other text"}, "unknown_schema"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "prompt_mismatch"),
]

# Kinds added for issue 9; each reason follows the spec in ropo_ray/data/normalize.py's docstring.
NEW_BAD_ROWS = [
    # a present prompt means the prompt/chosen/rejected schema: null is missing_field, a number wrong_type
    ({"prompt": None, "chosen": "A", "rejected": "B"}, "missing_field", "'prompt'"),
    ({"prompt": "Q", "chosen": None, "rejected": "B"}, "missing_field", "'chosen'"),
    ({"prompt": "Q", "chosen": "A", "rejected": None}, "missing_field", "'rejected'"),
    ({"prompt": None, "chosen": None, "rejected": None}, "missing_field", "'prompt'"),
    ({"prompt": 42, "chosen": "A", "rejected": "B"}, "wrong_type", "'prompt' is a int"),
    ({"prompt": "Q", "chosen": float("nan"), "rejected": "B"}, "wrong_type", "'chosen' is a float"),
    ({"prompt": "Q", "chosen": "A", "rejected": True}, "wrong_type", "'rejected' is a bool"),
    ({"prompt": "Q", "chosen": {"text": "A"}, "rejected": "B"}, "wrong_type", "'chosen' is a dict"),
    ({"prompt": "Q", "chosen": "A", "rejected": " \t\n\u00a0"}, "empty_response", "'rejected'"),
    ({"chosen": [USER, {"role": "assistant", "content": "4"}],
      "rejected": [USER, {"role": "assistant", "content": "\n "}]}, "empty_response", "'rejected'"),
    ({"chosen": [USER, {"role": "assistant", "content": "4"}], "rejected": "5"}, "malformed_messages", "'rejected'"),
    ({"prompt": "Q\ud800", "chosen": "A", "rejected": "B"}, "undecodable_text", "lone surrogate"),
    ({"chosen": [USER, {"role": "assistant", "content": "4\udfff"}],
      "rejected": [USER, {"role": "assistant", "content": "5"}]}, "undecodable_text", "chosen[1]"),
]


@pytest.mark.parametrize(("row", "reason", "fragment"), NEW_BAD_ROWS)
def test_new_bad_row_kinds_are_rejected_with_their_reason(row, reason, fragment):
    with pytest.raises(RowError) as err:
        normalize_row(row, CFG)
    assert err.value.reason == reason and fragment in err.value.detail


def test_extra_fields_of_any_type_are_ignored():
    """Ids are not part of a pair (pair_id is the content hash): non-string or repeated ids do not matter."""
    row = {"id": {"n": [1, 2]}, "prompt": "Q", "chosen": "A", "rejected": "B", "score": float("nan")}
    assert normalize_row(row, CFG)["chosen"] == "A"


BAD_JSON = [
    (b'{"prompt": "a\x01b", "chosen": "A", "rejected": "B"}', "invalid_json", "Invalid control character"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "nested too deeply"),
    (b'{"prompt": ' + b"7" * 5000 + b', "chosen": "A", "rejected": "B"}', "invalid_json", "4300 digits"),
    (b'{"prompt": "Q", "chosen": "good", "rejected": "bad", "chosen": "bad"}', "duplicate_key", "'chosen'"),
    (b'{"chosen": [{"role": "user", "content": "x", "role": "assistant"}], "rejected": []}', "duplicate_key",
     "'role'"),
    (b"null", "not_an_object", "a JSON null"),
    (b'"just a string"', "not_an_object", "a JSON string"),
    (b"3.5", "not_an_object", "a JSON number"),
]


@pytest.mark.parametrize(("raw", "reason", "fragment"), BAD_JSON)
def test_bad_json_lines_are_rejected_with_their_reason(raw, reason, fragment):
    with pytest.raises(RowError) as err:
        parse_json_line(raw)
    assert err.value.reason == reason and fragment in err.value.detail


def test_nan_parses_and_is_then_a_wrong_type():
    """NaN is not RFC 8259 JSON, but Parquet float columns serialise to it, so it parses; in a text field
    it is a wrong type, not invalid JSON (which would reject every row of a file with a float score)."""
    row = parse_json_line(b'{"prompt": "Q", "chosen": NaN, "rejected": "B", "score": NaN}')
    with pytest.raises(RowError) as err:
        normalize_row(row, CFG)
    assert err.value.reason == "wrong_type"


def test_a_row_over_max_row_bytes_is_rejected_before_parsing():
    cfg = DataConfig(max_row_bytes=1000)
    raw = b'{"prompt": "' + b"x" * 5000 + b'", "chosen": "A", "rejected": "B"}'  # 12 + 5000 + 34 = 5046 bytes
    out = prepare_row("f.jsonl", 3, raw, None, cfg)  # no tokenizer needed: it is never reached
    assert (out["split"], out["reason"]) == ("rejected", "row_too_large")
    assert "5046 bytes" in out["detail"] and "data.max_row_bytes=1000" in out["detail"]
    assert out["raw"] == raw[:1024].decode()
    # the reader passed only a prefix but the true size: still rejected, by size
    assert prepare_row("f.jsonl", 3, raw[:10], None, cfg, size=5046)["reason"] == "row_too_large"


def test_a_gigantic_jsonl_line_streams_in_bounded_memory(tmp_path):
    """A 48 MiB line between two good ones: the reader keeps at most max_row_bytes + 1 of it, so the
    peak of Python allocations stays near one 1 MiB read block plus that, not the line's size."""
    import tracemalloc

    import pyarrow as pa

    good = b'{"prompt": "Q", "chosen": "A", "rejected": "B"}'
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(good + b"\n" + b'{"prompt": "')
        for _ in range(48):
            f.write(b"y" * (1 << 20))
        f.write(b'", "chosen": "A", "rejected": "B"}\n' + good + b"\n")
    big = path.stat().st_size - 2 * (len(good) + 1) - 1  # the long line without its newline
    tracemalloc.start()
    with pa.input_stream(str(path)) as stream:
        rows = [r for c in iter_raw_rows(stream, "jsonl", max_row_bytes=1 << 20) for r in c]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(i, n) for i, _, n in rows] == [(1, len(good)), (2, big), (3, len(good))]
    assert rows[1][1] == (b'{"prompt": "' + b"y" * 2000)[:1024]
    assert rows[0][1] == rows[2][1] == good
    assert peak < 8 << 20, peak  # the line is 48 MiB


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_bad_rows_are_rejected_with_their_reason(row, reason):
    with pytest.raises(RowError) as err:
        normalize_row(row, CFG)
    assert err.value.reason == reason


def test_json_line_parsing():
    assert parse_json_line(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # BOM tolerated
    for raw, reason in ((b'{"a": 1', "invalid_json"), (b"[1, 2]", "not_an_object"),
                        (b'{"a": "\xff"}', "undecodable_text")):
        with pytest.raises(RowError) as err:
            parse_json_line(raw)
        assert err.value.reason == reason


def test_every_reason_is_reachable_here_or_in_preparation():
    covered = ({r for _, r in BAD_ROWS} | {"invalid_json", "not_an_object", "undecodable_text"}
               | {r for _, r, _ in NEW_BAD_ROWS + BAD_JSON} | {"row_too_large"})
    # too_long is decided by tokenisation, duplicate_pair across rows: both tested with the preparation.
    assert set(REASONS) - covered == {"too_long", "duplicate_pair"}
