"""Raw preference rows -> one schema (prompt messages, chosen text, rejected text), or a reason why not.

Three input schemas, detected per row unless `data.schema` names one:

- prompt_chosen_rejected: `prompt`, `chosen`, `rejected` strings (column names configurable);
- messages (UltraFeedback-binarized style): `chosen` / `rejected` are message lists that include
  the prompt turns and end with the assistant's answer; both must share the same prompt turns;
- hh_rlhf (Anthropic HH style): transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..." whose chosen and
  rejected share everything up to the last assistant turn.

Pure Python: the Ray Data preparation maps these over batches; tests call them on hand-made rows.
A row that cannot be used raises `RowError` with a reason from `REASONS`: nothing is dropped silently.

The reasons (what each one means; tests work expected reasons out from this list):

- row_too_large: the raw row is over `data.max_row_bytes` (decided by the reader, before parsing);
- undecodable_text: the bytes are not UTF-8, or a text holds U+FFFD or a lone surrogate (`\\ud800`);
- invalid_json: the line cannot be parsed (syntax, raw control characters in a string, nesting or
  numbers beyond the parser's limits);
- duplicate_key: an object names a key twice (which value is meant is ambiguous: one could flip the pair);
- not_an_object: the JSON value is not an object (array, string, number, null);
- missing_field: a field the schema needs is absent or null (a present `prompt` column means the
  prompt/chosen/rejected schema, so a null prompt is this, not unknown_schema);
- wrong_type: a field the schema needs as a string is another type (number, NaN, bool, object);
- unknown_schema: the fields match none of the three schemas;
- malformed_messages / unknown_role / no_assistant_turn / prompt_mismatch: message lists or
  transcripts that do not make one prompt and two answers;
- empty_prompt / empty_response: nothing but whitespace where text is needed;
- identical_responses: chosen equals rejected (ignoring surrounding whitespace);
- too_long (tokenisation, truncation `reject`) and duplicate_pair (across rows): decided later.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ropo_ray.config.schema import DataConfig

REASONS = (
    "invalid_json", "not_an_object", "undecodable_text", "missing_field", "wrong_type", "unknown_schema",
    "empty_prompt", "empty_response", "identical_responses", "malformed_messages", "unknown_role",
    "no_assistant_turn", "prompt_mismatch", "too_long", "duplicate_pair", "row_too_large", "duplicate_key",
)
ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class RowError(ValueError):
    """A row that cannot be used; `reason` is one of REASONS, the message says what and where."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RowError("duplicate_key", f"key {dup!r} appears more than once in one object")
    return obj


def parse_json_line(raw: bytes) -> dict[str, Any]:
    """One JSONL line -> its object. A UTF-8 BOM is tolerated; anything else wrong is a RowError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowError("undecodable_text", f"not UTF-8 at byte {err.start}") from None
    text = text.lstrip("\ufeff")
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except RowError:
        raise
    except json.JSONDecodeError as err:
        raise RowError("invalid_json", f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        raise RowError("invalid_json", "nested too deeply to parse") from None
    except ValueError as err:  # e.g. an integer literal past Python's digit limit
        raise RowError("invalid_json", str(err).split(";")[0]) from None
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"a JSON {_JSON_TYPES.get(type(obj), type(obj).__name__)}, not an object")
    return obj


def _check_text(value: str, where: str) -> None:
    if "\ufffd" in value:
        raise RowError("undecodable_text", f"{where} holds U+FFFD replacement characters")
    if _SURROGATE.search(value):
        raise RowError("undecodable_text", f"{where} holds a lone surrogate (not valid Unicode)")


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError("missing_field", f"field '{name}' is missing or null")
    return row[name]


def _text(row: dict[str, Any], name: str, empty_reason: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field '{name}' is a {type(value).__name__}, expected a string")
    _check_text(value, f"field '{name}'")
    if not value.strip():
        raise RowError(empty_reason, f"field '{name}' is empty")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError("malformed_messages", f"field '{name}' must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
                msg.get("content"), str):
            raise RowError("malformed_messages", f"{name}[{i}] needs string 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise RowError("unknown_role", f"{name}[{i}] has role {msg['role']!r}; expected one of {ROLES}")
        _check_text(msg["content"], f"{name}[{i}]")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _split_turns(messages: list[dict[str, str]], name: str) -> tuple[list[dict[str, str]], str]:
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"field '{name}' does not end with an assistant message")
    prompt, answer = messages[:-1], messages[-1]["content"]
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise RowError("empty_prompt", f"field '{name}' has no non-empty user turn before the answer")
    if not answer.strip():
        raise RowError("empty_response", f"the last assistant message of '{name}' is empty")
    return prompt, answer


def _from_messages(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str, str]:
    chosen_prompt, chosen = _split_turns(_messages(_field(row, cfg.chosen_column), cfg.chosen_column),
                                         cfg.chosen_column)
    rejected_prompt, rejected = _split_turns(_messages(_field(row, cfg.rejected_column), cfg.rejected_column),
                                             cfg.rejected_column)
    if chosen_prompt != rejected_prompt:
        raise RowError("prompt_mismatch", "chosen and rejected have different prompt turns")
    return chosen_prompt, chosen, rejected


def _hh_turns(transcript: str, name: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise RowError("malformed_messages", f"field '{name}' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' "
                                             "transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _from_hh(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str, str]:
    chosen_prompt, chosen = _split_turns(_hh_turns(_text(row, cfg.chosen_column, "empty_response"),
                                                   cfg.chosen_column), cfg.chosen_column)
    rejected_prompt, rejected = _split_turns(_hh_turns(_text(row, cfg.rejected_column, "empty_response"),
                                                       cfg.rejected_column), cfg.rejected_column)
    if chosen_prompt != rejected_prompt:
        raise RowError("prompt_mismatch", "chosen and rejected transcripts differ before the last assistant turn")
    return chosen_prompt, chosen, rejected


def _from_strings(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str, str]:
    prompt = _text(row, cfg.prompt_column, "empty_prompt")
    return ([{"role": "user", "content": prompt}], _text(row, cfg.chosen_column, "empty_response"),
            _text(row, cfg.rejected_column, "empty_response"))


PARSERS = {"prompt_chosen_rejected": _from_strings, "messages": _from_messages, "hh_rlhf": _from_hh}


def detect_schema(row: dict[str, Any], cfg: DataConfig) -> str:
    """The row's schema: the configured one, or guessed from its fields."""
    if cfg.schema != "auto":
        return cfg.schema
    chosen = row.get(cfg.chosen_column)
    if isinstance(chosen, (list, tuple)):
        return "messages"
    if isinstance(row.get(cfg.prompt_column), str):
        return "prompt_chosen_rejected"
    if isinstance(chosen, str) and _HH_TURN.search(chosen):
        return "hh_rlhf"
    if cfg.prompt_column in row:  # a null or non-string prompt: the parser names the field
        return "prompt_chosen_rejected"
    if chosen is None or cfg.rejected_column not in row:
        missing = [c for c in (cfg.chosen_column, cfg.rejected_column) if row.get(c) is None]
        raise RowError("missing_field", f"field(s) {missing} missing or null")
    raise RowError("unknown_schema", f"fields {sorted(row)} match none of prompt/chosen/rejected strings, "
                                     "message lists, or Human/Assistant transcripts")


def normalize_row(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """-> {"messages": prompt turns, "chosen": text, "rejected": text}, or RowError."""
    schema = detect_schema(row, cfg)
    messages, chosen, rejected = PARSERS[schema](row, cfg)
    if chosen.strip() == rejected.strip():
        raise RowError("identical_responses", "chosen and rejected responses are identical")
    return {"messages": messages, "chosen": chosen, "rejected": rejected, "schema": schema}
