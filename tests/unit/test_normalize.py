"""Row normalisation and validation: every schema, every rejection reason, on hand-made rows."""

from __future__ import annotations

import pytest

from ropo_ray.config.schema import DataConfig
from ropo_ray.data.normalize import REASONS, RowError, normalize_row, parse_json_line

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
    covered = {r for _, r in BAD_ROWS} | {"invalid_json", "not_an_object", "undecodable_text"}
    # too_long is decided by tokenisation, duplicate_pair across rows: both tested with the preparation.
    assert set(REASONS) - covered == {"too_long", "duplicate_pair"}
