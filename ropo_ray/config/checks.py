"""The configuration's error type and its one validation helper, shared by every config area."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError("key: msg") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
