"""A task that leaves a mark for every run of an item: the failover test counts the items that ran twice."""

from __future__ import annotations

import os
from typing import IO

import fanout

_open: dict[str, IO[str]] = {}


@fanout.task
def mark(value: int, marks: str = "") -> int:
    """Two times ``value``; with ``marks`` (a directory), one line per run in this process's file there."""
    if marks:
        log = _open.get(marks)
        if log is None:
            log = _open[marks] = open(os.path.join(marks, f"{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
        log.write(f"{value}\n")
    return value * 2
