"""Redelivered batches and poison items: every item is reported once, none is tried forever.

A header task's message is acknowledged only after the batch ran (late acks).
When the pool process running it dies - killed by the OOM killer, a segfault
in a decoder, ``kill -9``, or the hard time limit - the message goes back to
the queue (``task_reject_on_worker_lost``, and :class:`HeaderRequest` for the
time limit) instead of failing the whole chord.  That alone would loop
forever on an item that kills its process every time, so each batch run is
counted in Redis:

* the first run of a batch just runs it (no per-item bookkeeping);
* a rerun goes item by item and counts, per item, the runs that started it
  and never finished: those are the runs its process died in.  An item that
  has taken its process down :data:`MAX_KILLS` counted times (so at most
  ``MAX_KILLS + 1`` deaths, with the uncounted first run) is not run again but
  reported as failed with that reason, and the rest of the batch goes on.

The counting is a plain function over a small :class:`AttemptLog` protocol;
:class:`RedisAttemptLog` keeps it next to the results, with the same expiry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from workers import keys, logs
from workers.backend import REDIS_FULL, retrying
from workers.errors import WorkerKilled
from workers.fanin import Part, run_batch

logger = logging.getLogger(__name__)

#: An item whose run took its worker process down this many times is failed, not retried.
MAX_KILLS = 2


class AttemptLog(Protocol):
    """Where a batch's runs are counted; it must outlive any one worker process."""

    def batch_started(self) -> int:
        """Count one more run of the batch; return how many runs have started, this one included."""
        ...

    def item_started(self, index: int) -> int:
        """Count one more unfinished run of item ``index``; return the count, this one included."""
        ...

    def item_finished(self, index: int) -> None:
        """Item ``index`` ran to its end (succeeded or raised): its process survived it."""
        ...


def run_counted(
    work: Callable[[Any], Any],
    start: int,
    items: Sequence[Any],
    log: AttemptLog,
    label: Callable[[Any], Any] = lambda item: item,
    stop_on: tuple[type[BaseException], ...] = (),
    stopped: Callable[[BaseException], tuple[str, str]] = lambda exc: ("stopped", "stopped"),
) -> Part:
    """:func:`~workers.fanin.run_batch`, except that an item which killed its process
    :data:`MAX_KILLS` times is reported as failed instead of being run again."""
    if log.batch_started() == 1:
        return run_batch(work, start, items, label, stop_on, stopped)

    def guarded(numbered: tuple[int, Any]) -> Any:
        offset, item = numbered
        index = start + offset
        runs = log.item_started(index)
        if runs > MAX_KILLS:
            logger.warning(
                "item %d (%r) killed its worker process each of the %d times it ran: failed, not run again",
                index, label(item), runs - 1,
            )  # fmt: skip
            raise WorkerKilled(
                str(label(item)),
                f"its worker process died each of the {runs - 1} times it ran this item "
                "(killed by the OOM killer, a crash, or the hard time limit); not retried",
            )
        try:
            result = work(item)
        except Exception:
            log.item_finished(index)  # an ordinary failure: its process survived it
            raise
        # Not in a `finally`: the SIGTERM that ends a pool process at the hard time
        # limit unwinds this frame, and that run must stay counted as a death.
        log.item_finished(index)
        return result

    return run_batch(
        guarded, start, list(enumerate(items)), lambda numbered: label(numbered[1]), stop_on, stopped
    )


class RedisAttemptLog:
    """An :class:`AttemptLog` for one task id, in Redis (the result backend's client).

    A Redis at its maxmemory refuses the counts: the batch then runs uncounted (as a
    first run), rather than wait for room before its first item and fail its items at
    the soft time limit.  While Redis is full, a batch whose process dies cannot go
    back on the queue either (it stays in ``unacked``), so nothing reruns uncounted.
    """

    def __init__(self, client: Any, task_id: str, expires: int, runs: int | None = None) -> None:
        """``runs``: the batch's run count, if it was counted already (in the batch's first round
        trip, :func:`workers.batchio.start_batch`); :meth:`batch_started` then just returns it."""
        self.client = client
        self.runs_key = keys.batch_runs(task_id)
        self.items_key = keys.item_runs(task_id)
        self.expires = expires
        self.runs = runs

    def batch_started(self) -> int:
        if self.runs is not None:
            return self.runs

        def count() -> int:
            with self.client.pipeline() as pipe:
                runs, _ = pipe.incr(self.runs_key).expire(self.runs_key, self.expires).execute()
            return int(runs)

        return _or_uncounted(count, "counting a batch run", 1)

    def drop_counts(self, pipe: Any) -> None:
        """Queue the deletion of the batch's counts on ``pipe``: once it ran to its end, they are
        needed no more (a copy delivered later runs as a first run, safely)."""
        pipe.delete(self.runs_key, self.items_key)

    def item_started(self, index: int) -> int:
        def count() -> int:
            with self.client.pipeline() as pipe:
                pipe.hincrby(self.items_key, str(index), 1).expire(self.items_key, self.expires)
                runs, _ = pipe.execute()
            return int(runs)

        return _or_uncounted(count, "counting an item run", 1)

    def item_finished(self, index: int) -> None:
        _or_uncounted(lambda: self.client.hincrby(self.items_key, str(index), -1), "counting an item run", 0)


def _or_uncounted(count: Callable[[], int], what: str, uncounted: int) -> int:
    """``count()``, retried while Redis is down; ``uncounted`` at once if Redis is full."""
    try:
        return retrying(count, what, full_for=0)
    except REDIS_FULL:
        logger.warning("Redis is full (at its maxmemory): %s skipped, the batch runs uncounted", what)
        return uncounted


class HeaderRequest(Request):  # type: ignore[misc]
    """A header task's request: a hard time limit puts the batch back, as a lost worker does.

    Celery records a hard time limit as the task's FAILURE, and one failed
    header fails the whole chord with ``ChordError``.  Requeued instead, the
    batch runs again and :func:`run_counted` fails only the item that was
    running, once it has hit the limit :data:`MAX_KILLS` times.
    """

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, TimeLimitExceeded) and not worker_state.should_terminate:
            worker_state.task_ready(self)
            logger.warning(
                "hard time limit: requeueing %s[%s] to run again",
                self.name, self.id, extra=logs.extra(logs.of_request(self)),
            )  # fmt: skip
            self.reject(requeue=True)
            return None
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or worker_state.should_terminate:
            with logs.naming(logs.of_request(self)):  # Celery's "Soft time limit ... exceeded" line
                super().on_timeout(soft, timeout)
            return
        worker_state.task_ready(self)
        logger.error(
            "hard time limit (%ss) exceeded for %s[%s]: requeued",
            timeout, self.name, self.id, extra=logs.extra(logs.of_request(self)),
        )  # fmt: skip
        self.reject(requeue=True)  # a no-op if on_failure already did
