"""A user's own task module, outside the fanout package, written against the public API only.

The session's worker imports it through ``FANOUT_IMPORTS`` (see tests/conftest.py), exactly as a
user's workers would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fanout


class Flaky(Exception):
    """A failure worth another try."""


@fanout.task
def triple(value: int) -> int:
    """Three times ``value``; anything else raises TypeError, which becomes the item's error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {type(value).__name__}")
    return value * 3


@fanout.task(batch_size=10_000)
def double(value: int) -> int:
    return value * 2


@fanout.task
def scale(record: dict[str, Any], factor: float = 1.0) -> float:
    """A record's ``x`` times ``factor`` (given once per job through ``kwargs``)."""
    return float(record["x"]) * factor


@fanout.task
def not_json(value: Any) -> Any:
    """Returns a set: not JSON, so the item fails naming the type."""
    return {value}


@fanout.task
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@fanout.task(time_limit=3)
def sleepy_limited(seconds: float) -> float:
    """Like ``sleepy``, with a 3 s hard limit per batch (so a soft limit at 2 s)."""
    time.sleep(seconds)
    return seconds


_calls: dict[str, int] = {}


@fanout.task(retries=2, retry_on=(Flaky,), backoff=0.01)
def flaky(key: str) -> str:
    """Fails with Flaky the first two times it sees ``key`` in this process, then succeeds."""
    _calls[key] = _calls.get(key, 0) + 1
    if _calls[key] <= 2:
        raise Flaky(f"attempt {_calls[key]} of {key}")
    return f"{key} after {_calls[key]} attempts"


@fanout.task(retries=1, retry_on=(Flaky,), backoff=0.01)
def always_flaky(key: str) -> str:
    raise Flaky(f"{key} never works")


@fanout.task
def total(results: list[Any], errors: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """A reduce: the sum of the results that succeeded, and the failed indexes."""
    return {
        "sum": sum(r for r in results if r is not None) + offset,
        "failed": [e["index"] for e in errors],
    }


@fanout.task
def broken_reduce(results: list[Any], errors: list[dict[str, Any]]) -> int:
    raise RuntimeError("the reduce itself fails")


@fanout.task
def odd_fails(value: int, seconds: float = 0.0) -> int:
    """``value`` after ``seconds``; an odd value fails (ValueError)."""
    time.sleep(seconds)
    if value % 2:
        raise ValueError(f"{value} is odd")
    return value


@fanout.task
def needs_file(path: str) -> str:
    """Reads the file at ``path``: fails until it exists (a failure that a retry can mend)."""
    with open(path) as fh:
        return fh.read().strip()


@fanout.task
def map_inside(value: int) -> list[Any]:
    """Waits on a fan-out of its own: refused (``fanout.WaitInsideTask``), so the item fails at once."""
    return list(fanout.map(triple, [value]).results)


@fanout.task
def wait_inside(value: int) -> list[Any]:
    """Sends a fan-out of its own (allowed), then waits on it (refused), so the item fails at once."""
    return list(fanout.submit(triple, [value]).results())


@fanout.task
def submit_folder(folder: str) -> str:
    """The outer level of a two-level fan-out: sends a job over the folder's files (read by
    ``needs_file``) and returns its id, for the caller to attach and wait for."""
    files = sorted(str(path) for path in Path(folder).iterdir() if path.is_file())
    return fanout.submit(needs_file, files).id


def _unlucky_sum(total: int, value: int) -> int:
    """A fold's step: the sum, except that 13 makes it raise."""
    if value == 13:
        raise ValueError("13 is unlucky")
    return total + value


def _refuse(total: int, partial: int) -> int:
    raise RuntimeError("this merge refuses every partial")


@fanout.task(fold=fanout.Fold(_unlucky_sum, initial=0))
def unlucky(value: int) -> int:
    """Folded into a sum (a step that raises at 13); a value that is not an int fails as an item."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {type(value).__name__}")
    return value


@fanout.task(fold=fanout.Fold(_unlucky_sum, merge=_refuse, initial=0))
def unmergeable(value: int) -> int:
    """Folded within each batch, but its merge raises."""
    return value


@fanout.task(fold=fanout.Fold(_unlucky_sum, initial=0))
def slow_one(seconds: float) -> int:
    """1 after ``seconds``, folded into a sum: the value is how many items succeeded."""
    time.sleep(seconds)
    return 1


@fanout.task
def mark(item: list[Any]) -> int:
    """Leaves a file named ``item[1]`` in the directory ``item[0]``: the proof that the item ran."""
    folder = Path(item[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(item[1])).touch()
    return int(item[1])
