"""Test-only work that misbehaves on purpose: slow items, items that kill or hang their process.

Workers started by the fault tests load this module (``--include tests.faulty``,
as ``FANOUT_IMPORTS`` would).  It is a fanout task written as any user writes
one, so it goes through the same machinery as every job (late acks, the header
request, the attempt log, the soft time limit); only the work is rigged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

import fanout
from workers.doubling import double

#: Values with a meaning to ``rigged_batch``.
KILL = "kill"  # the item SIGKILLs its own pool process, every time
KILL_ONCE = "kill-once"  # ... only the first time (an OOM kill that does not recur)
HANG = "hang"  # the item ignores the soft time limit, so the hard one kills it


@fanout.task(name="fanout.test.rigged_batch")
def rigged_batch(value: Any, seconds: float = 0.0, marks: str = "") -> int:
    """Double ``value`` after ``seconds``; values given as [KILL, ...] and the like misbehave.

    ``marks`` is a directory where every run of an item leaves a file, so a test
    can count the runs.
    """
    if marks:
        fd, _ = _mark(Path(marks), value)
        os.close(fd)
    if isinstance(value, list) and value:
        if value[0] == KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if value[0] == KILL_ONCE and _mark(Path(marks), ["once", *value[1:]], exclusive=True)[0] >= 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if value[0] == HANG:
            while True:
                with contextlib.suppress(SoftTimeLimitExceeded):
                    time.sleep(100)
        value = value[1]
    time.sleep(seconds)
    return double(value)


def _mark(directory: Path, value: Any, exclusive: bool = False) -> tuple[int, str]:
    name = str(value).replace("/", "_").replace(" ", "")
    if exclusive:
        path = directory / f"{name}"
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), str(path)
        except FileExistsError:
            return -1, str(path)
    path = directory / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
    return os.open(path, os.O_CREAT | os.O_WRONLY), str(path)


@fanout.task(name="fanout.test.padded", batch_size=200)
def padded(value: int, size: int = 512) -> str:
    """A result of about ``size`` bytes for ``value``: jobs whose results fill a small Redis."""
    return f"{value}:" + "x" * size


def _sum(total: int, value: int) -> int:
    return total + value


@fanout.task(name="fanout.test.rigged_fold", fold=fanout.Fold(_sum, initial=0))
def rigged_fold(value: Any, seconds: float = 0.0, marks: str = "") -> int:
    """``rigged_batch``, its results folded into their sum (each batch reports a partial sum)."""
    return rigged_batch(value, seconds, marks)
