"""The soft time limit stops items, never a batch's bookkeeping.

Celery's prefork pool raises the soft time limit as ``SoftTimeLimitExceeded``
from a SIGUSR1 handler, wherever the pool process happens to be.  Inside the
item loop that is what we want: the batch stops at the item it interrupts
(:func:`workers.fanin.run_batch`).  Once the loop is over, though, the batch
has its part and only reports it (the attempt log, the failure budget, the
part's file, the chord's join); an exception there, during a Redis restart
for instance, fails the header and with it the whole chord (``ChordError``).

So from the end of the item loop until the task has ended (Celery's
``task_postrun``), the signal is *held*: noted and logged, not raised.  The
hard time limit still bounds the report, and a batch it kills is put back on
the queue (:class:`workers.attempts.HeaderRequest`).

This swaps the handler billiard installs in its pool processes
(``billiard.pool.soft_timeout_sighandler``, not a documented API): the swap is
made only when that very handler is installed, in the main thread, and is a
no-op otherwise (a solo or thread pool has no soft limit to hold).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from celery.signals import task_postrun

logger = logging.getLogger(__name__)

#: The soft time limit's signal (billiard's SIG_SOFT_TIMEOUT), where the platform has it.
SIGNAL: int | None = getattr(signal, "SIGUSR1", None)


class _Hold:
    def __init__(self, what: str, previous: Any) -> None:
        self.what = what
        self.previous = previous
        self.fired = False

    def note(self, signum: int, frame: Any) -> None:
        if not self.fired:
            logger.warning(
                "soft time limit reached while %s: noted, not raised (the batch's items are done; "
                "the hard time limit still bounds this)",
                self.what,
            )
        self.fired = True


_hold: _Hold | None = None


def _pool_handler() -> Callable[..., Any] | None:
    """billiard's soft-limit handler, if it is installed for SIGUSR1 in this process."""
    try:
        from billiard import pool
    except ImportError:  # pragma: no cover - billiard comes with Celery
        return None
    handler: Callable[..., Any] | None = getattr(pool, "soft_timeout_sighandler", None)
    if SIGNAL is None or handler is None or signal.getsignal(SIGNAL) is not handler:
        return None
    return handler


def hold(what: str) -> bool:
    """Hold the soft time limit from now until :func:`release` (at the latest when the task ends).

    ``what`` says what runs meanwhile, for the log.  Returns whether it is held
    (it is not outside a prefork pool process, where there is nothing to hold).
    """
    global _hold
    if _hold is not None:
        return True
    if SIGNAL is None or threading.current_thread() is not threading.main_thread():
        return False
    handler = _pool_handler()
    if handler is None:
        return False
    _hold = _Hold(what, handler)
    signal.signal(SIGNAL, _hold.note)
    return True


def release() -> bool:
    """Let the soft time limit raise again; return whether it fired while held."""
    global _hold
    held, _hold = _hold, None
    if held is None:
        return False
    if SIGNAL is not None and threading.current_thread() is threading.main_thread():
        signal.signal(SIGNAL, held.previous)
    return held.fired


@contextlib.contextmanager
def held(what: str) -> Iterator[None]:
    """Hold the soft time limit for the block, unless it is held already (then until that hold ends)."""
    if _hold is not None:
        yield
        return
    hold(what)
    try:
        yield
    finally:
        release()


def _release_at_task_end(**_: Any) -> None:
    release()


task_postrun.connect(_release_at_task_end, weak=False)
