"""Test-only header tasks that misbehave on purpose: slow items, items that kill or hang their process.

Workers started by the fault tests load this module (``--include tests.faulty``).
The tasks go through the same machinery as the real ones (late acks,
:class:`~workers.attempts.HeaderRequest`, :func:`~workers.attempts.run_counted`);
only the work is rigged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from workers.app import app
from workers.doubling import double
from workers.fanin import Part
from workers.tasks import HEADER_REQUEST, attempt_log

#: Values with a meaning to ``rigged_batch``.
KILL = "kill"  # the item SIGKILLs its own pool process, every time
KILL_ONCE = "kill-once"  # ... only the first time (an OOM kill that does not recur)
HANG = "hang"  # the item ignores the soft time limit, so the hard one kills it


@app.task(  # type: ignore[untyped-decorator]
    name="fanout.test.rigged_batch", bind=True, ignore_result=True, Request=HEADER_REQUEST
)
def rigged_batch(self: Task, start: int, values: list[Any], seconds: float = 0.0, marks: str = "") -> Part:
    """Double ``values`` after ``seconds`` each; items named in ``values`` as [KILL, ...] misbehave.

    ``marks`` is a directory where every run of an item leaves a file, so a test
    can count the runs.
    """

    def work(value: Any) -> Any:
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

    from workers.attempts import run_counted

    return run_counted(work, start, values, attempt_log(self))


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
