"""The semantic checks schemas run in ``__post_init__``; every failure names the key, the value
and a fix."""

from __future__ import annotations

from typing import Any

from metarun.spec.errors import ConfigError


def require(ok: bool, key: str, value: Any, requirement: str, example: str) -> None:
    """Unless ``ok``, raise :class:`ConfigError`
    ``"<key> must be <requirement>, got <value> (set e.g. <example>)"``."""
    if not ok:
        raise ConfigError(f"{key} must be {requirement}, got {value!r} (set e.g. {example})")


def require_range(key: str, value: list[float], example: str) -> None:
    require(
        len(value) == 2 and value[0] <= value[1],
        key,
        list(value),
        "[low, high] with low <= high",
        example,
    )


def require_optional_count(key: str, value: int | None, example: str) -> None:
    require(value is None or value >= 1, key, value, ">= 1 or null", example)
