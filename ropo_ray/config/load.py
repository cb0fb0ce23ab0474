"""Build a `Config` from YAML overrides and dotted CLI overrides, with errors that name the key.

    cfg = load_config("pipelines/configs/demo.yaml", ["train.lr=1e-4", "adapter.block_sizes=[2,4]"])

Values are coerced to the field's annotated type (a YAML `1e-4` is a string to PyYAML; the float
field makes it a float). An unknown key names the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ropo_ray.config.schema import Config, ConfigError


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    choices = get_args(tp)
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        near = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{near}")
    return value


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if value is None and len(args) < len(get_args(tp)):
        return None
    return _coerce(value, args[0], key)


def _coerce_tuple(value: Any, tp: Any, key: str) -> tuple:
    args = get_args(tp)
    if isinstance(value, str):  # "2,4" or "[2, 4]" from the command line
        value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
    if not isinstance(value, (list, tuple)):
        value = [value]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _coerce_number(value: Any, tp: type, key: str) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)  # PyYAML reads "1e-4" as a string; float() takes it
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is int:
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    return number


def _coerce_str(value: Any, key: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to annotation `tp`; raise ConfigError naming `key` when it cannot."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    by_origin = {Literal: _coerce_literal, Union: _coerce_union, types.UnionType: _coerce_union, tuple: _coerce_tuple}
    origin = get_origin(tp)
    if origin in by_origin:
        return by_origin[origin](value, tp, key)
    if tp is bool:
        return _coerce_bool(value, key)
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        return _coerce_str(value, key)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            hint = difflib.get_close_matches(str(name), names, n=1)
            near = f"; did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown key '{key}'{near} (valid: {', '.join(names)})")
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", "1e-4"); `adapter.block_sizes=[2,4]` -> (..., [2, 4])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML / JSON output; round-trips through load."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file at `path` <- dotted `overrides`, validated into a frozen Config."""
    tree: dict[str, Any] = {}
    if path is not None:
        from ropo_ray.storage import Store

        if not Store(path).is_file():
            raise ConfigError(f"--config: {path} is not a file")
        text = Store(path).read_text()  # a local file or an object-store URI
        try:  # the safe loader: a Python object tag (!!python/object/apply:...) is an error, never run
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not a plain YAML config ({' '.join(str(err).split())})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal Config (a local path or a URI)."""
    from ropo_ray.storage import store

    store(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def with_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """`cfg` with dotted overrides applied on top, validated like `load_config`."""
    tree = config_to_dict(cfg)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")
