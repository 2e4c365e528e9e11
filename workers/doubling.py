"""Doubling: the simplest work item there is."""

from __future__ import annotations

from workers.errors import InvalidNumber


def double(value: object) -> int:
    """Return twice ``value``, which must be an ``int`` (any size; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidNumber(repr(value), f"expected an integer, got {type(value).__name__}")
    return value * 2
