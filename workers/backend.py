"""The result backend: Celery's Redis (or Sentinel) backend, its chord count riding out a Redis restart."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import celery
import redis
from celery.backends import redis as celery_redis
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.states import READY_STATES
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers import keys, softlimit
from workers.connections import following
from workers.memory import REMEDY

logger = logging.getLogger(__name__)

#: How long a worker keeps retrying Redis for one operation (a restart takes seconds).
RETRY_FOR_S = 60.0
#: How long it keeps retrying a write Redis refuses for want of memory: until an operator
#: makes room.  In a pool process the task's hard time limit usually ends the wait first,
#: and the batch goes back to the queue (its message stays in `unacked` meanwhile).
FULL_RETRY_FOR_S = 600.0
#: Errors that mean "Redis is not there right now" rather than "this is wrong".
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
#: ...and "Redis is there but full" (maxmemory, noeviction): it passes once there is room.
REDIS_FULL = (redis.OutOfMemoryError,)

T = TypeVar("T")


def retrying(
    operation: Callable[[], T], what: str, retry_for: float = RETRY_FOR_S, full_for: float = FULL_RETRY_FOR_S
) -> T:
    """Run ``operation``, retrying while Redis is down, for at most ``retry_for`` seconds,
    or while it is full (its maxmemory), for at most ``full_for`` seconds."""
    started = time.monotonic()
    pause = 0.2
    while True:
        try:
            return operation()
        except REDIS_DOWN + REDIS_FULL as exc:
            full = isinstance(exc, REDIS_FULL)
            if time.monotonic() + pause > started + (full_for if full else retry_for):
                raise
            if full:
                logger.warning(
                    "Redis is full (at its maxmemory) during %s; retrying in %.1f s until it has room: %s",
                    what, pause, REMEDY,
                )  # fmt: skip
            else:
                logger.warning("Redis unavailable during %s (%s); retrying in %.1f s", what, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0 if not full else 5.0)


#: Replicas found behind for this long between two warnings are not warned about again.
LATE_REPLICA_LOG_EVERY_S = 30.0
_late_logged_at = float("-inf")


def replicated(client: Any, what: str) -> None:
    """Wait (Redis WAIT) for FANOUT_WAIT_REPLICAS replicas to have this connection's writes so far.

    At most FANOUT_WAIT_MS; a replica that is late or missing is logged (once in a while),
    never raised: the write itself has succeeded on the master.
    """
    global _late_logged_at
    from workers.settings import get_settings

    settings = get_settings()
    if settings.wait_replicas <= 0:
        return
    try:
        acked = int(client.wait(settings.wait_replicas, settings.wait_ms))
    except redis.RedisError as exc:
        acked, reason = 0, f" ({exc})"
    else:
        reason = ""
    now = time.monotonic()
    if acked < settings.wait_replicas and now - _late_logged_at >= LATE_REPLICA_LOG_EVERY_S:
        _late_logged_at = now
        logger.warning(
            "%d of %d replica(s) had %s within %d ms%s: a failover now could lose it",
            acked, settings.wait_replicas, what, settings.wait_ms, reason,
        )  # fmt: skip


#: Where a header task leaves its batch's last writes for its chord report, on its Celery request.
BATCH_END_ATTRIBUTE = "fanout_batch_end"


class BatchWrites(Protocol):
    """A batch's last writes (:class:`workers.batchio.BatchEnd`), as the chord report sends them."""

    def queue(self, pipe: Any) -> Any:
        """Queue the writes on ``pipe``; return what :meth:`settle` needs to find their replies."""
        ...

    def settle(self, placed: Any, replies: list[Any]) -> None:
        """``pipe`` ran: the writes are made, here are all its replies."""
        ...

    def send(self, client: Any) -> None:
        """Make the writes on their own (once: nothing if they were made already)."""
        ...


@dataclass
class _Report:
    """A chord report in progress: the batch's last writes and its done bit (group id, index)."""

    end: BatchWrites | None
    done: tuple[str, int] | None
    #: The fold ran: the writes, the part and the done bit are in Redis.
    sent: bool = False


class RetryingChordMixin:
    """A header's report to its chord is retried while Redis is down or full (or a Sentinel
    fails over), and marked in the job's done bitmap once the chord has it.

    Unretried, a chord part reported during a Redis restart raises, Celery then
    marks the header FAILED, and one failed header fails the whole chord.  The
    report is a Lua script that counts each task id once, so sending it again
    is safe.  The soft time limit is held meanwhile (:mod:`workers.softlimit`):
    raised in here, even inside Celery's join of the last part, it would fail
    the chord as surely.  The done bitmap (``keys.done``) is what the healer reads
    to know which batches the chord has counted; it is set after the report, so a
    batch marked done is always counted, and before the message is
    acknowledged, so a batch is always in one of the broker's places or done.

    With the Celery pinned (:data:`FOLDS`), the batch's last writes
    (:class:`workers.batchio.BatchEnd`), the report and the done bit are one MULTI/EXEC:
    one round trip instead of three, all or nothing.
    """

    client: Any
    expires: Any

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Celery's own retries of a result it stores (``result_backend_always_retry``) cover a full
        Redis too: the chord callback's outcome is written once, after the parts it merged are gone."""
        return isinstance(exc, REDIS_FULL) or bool(super().exception_safe_to_retry(exc))  # type: ignore[misc]

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        what = f"the chord report of {request.id}"
        end: BatchWrites | None = getattr(request, BATCH_END_ATTRIBUTE, None)
        group, index = getattr(request, "group", None), getattr(request, "group_index", None)
        done = (str(group), int(index)) if group and index is not None else None
        with softlimit.held(what):
            if not FOLDS and end is not None:  # the writes first: a budget's stop precedes the callback
                end.send(self.client)
            report = self._fanout_report = _Report(end, done) if FOLDS else None
            try:
                returned = retrying(
                    lambda: super(RetryingChordMixin, self).on_chord_part_return(  # type: ignore[misc]
                        request, state, result, **kwargs
                    ),
                    what,
                )
            finally:
                self._fanout_report = None
            if report is None or not report.sent:  # reported without the fold
                if end is not None:
                    end.send(self.client)
                if done is not None:
                    retrying(
                        lambda: mark_done(self.client, done[0], [done[1]], self.expires),
                        "marking a batch done",
                    )
            replicated(self.client, what)
            return returned

    #: The chord report this backend is making, while it folds the batch's writes into it.
    _fanout_report: _Report | None = None

    @property
    def _chord_part_return_script(self) -> Any:
        """Celery's chord count, run in one MULTI/EXEC with the batch's last writes before it and
        its done bit after it, while :meth:`on_chord_part_return` folds (:data:`FOLDS`)."""
        script = super()._chord_part_return_script  # type: ignore[misc]
        report = self._fanout_report
        if report is None:
            return script

        def folded(keys: list[Any], args: list[Any], client: Any = None) -> Any:
            assert _CHORD_PART_RETURN_LUA is not None  # FOLDS checked it
            with (client or self.client).pipeline() as pipe:
                placed = report.end.queue(pipe) if report.end is not None else None
                at = len(pipe)
                pipe.eval(_CHORD_PART_RETURN_LUA, len(keys), *keys, *args)
                if report.done is not None:
                    queue_done(pipe, report.done[0], [report.done[1]], self.expires)
                replies = pipe.execute()
            if report.end is not None:
                report.end.settle(placed, replies)
            report.sent = True
            return replies[at]

        return folded

    def _store_result(self, task_id: str, result: Any, state: str, *args: Any, **kwargs: Any) -> Any:
        stored = super()._store_result(task_id, result, state, *args, **kwargs)  # type: ignore[misc]
        if state in READY_STATES:  # an outcome (the headers' results are not stored at all)
            replicated(self.client, f"the result of {task_id}")
        return stored


class RetryingRedisBackend(RetryingChordMixin, RedisBackend):  # type: ignore[misc]
    """Celery's Redis backend, with the chord report retried and marked done (RetryingChordMixin)."""


#: How long one command of the Sentinel backend keeps retrying through a failover: Sentinel
#: names a new master seconds after ``down-after-milliseconds`` (30 s in Sentinel's sample
#: configuration), and every retry asks the Sentinels again.
FAILOVER_RETRIES = 20  # 0.4, 0.8, 1.6, then 2 s apart: about 35 s in all


class RetryingSentinelBackend(RetryingChordMixin, SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel backend (the master the Sentinels name), with the same chord report,
    and every command retried through a failover.

    Celery catches a connection error in the chord's join (the last header's
    ``on_chord_part_return``, past the part the mixin retries) and fails the whole
    chord with ``ChordError('Join error: ...')``; a join that runs while Sentinel
    promotes a replica must wait for the new master instead, as must a part's
    report or a result.  redis-py's default (3 quick retries) is over before a
    failover is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Each retry asks the Sentinels for the master (redis-py's own class keeps the old one).
        self.connparams["connection_class"] = following(self.connparams.get("connection_class"))
        self.connparams["retry"] = Retry(ExponentialBackoff(cap=2.0, base=0.2), retries=FAILOVER_RETRIES)
        self.connparams["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]


def mark_done(client: Any, group_id: str, indexes: list[int], expires: int | None) -> None:
    """Mark batches ``indexes`` of group ``group_id`` as counted by the chord (one round trip)."""
    with client.pipeline(transaction=False) as pipe:
        queue_done(pipe, group_id, indexes, expires)
        pipe.execute()


def queue_done(pipe: Any, group_id: str, indexes: list[int], expires: int | None) -> None:
    """Queue :func:`mark_done`'s commands on ``pipe``."""
    key = keys.done(group_id)
    for index in indexes:
        pipe.setbit(key, index, 1)
    if expires:
        pipe.expire(key, int(expires))


def _folds() -> bool:
    """Whether Celery's Redis backend asks for its chord script as Celery 5.7's does.

    ``on_chord_part_return`` runs ``self._chord_part_return_script(keys=[6 keys],
    args=[8 arguments], client=...)``; fanout runs that script itself, in one
    MULTI/EXEC with the batch's last writes and its done bit.  Any other shape: the
    writes, Celery's own report and the done bit go one after the other (three round
    trips), which is all the same to every guarantee.
    """
    try:
        source = inspect.getsource(RedisBackend.on_chord_part_return)
    except (OSError, TypeError):
        return False
    return (
        tuple(celery.VERSION[:2]) == (5, 7)
        and isinstance(_CHORD_PART_RETURN_LUA, str)
        and "KEYS[6]" in _CHORD_PART_RETURN_LUA
        and "ARGV[8]" in _CHORD_PART_RETURN_LUA
        and "self._chord_part_return_script(" in source
    )


#: Celery's chord count, a Lua script (a private part of its Redis backend).
_CHORD_PART_RETURN_LUA: str | None = getattr(celery_redis, "CHORD_PART_RETURN_LUA", None)


#: Whether the chord report carries the batch's last writes (see :func:`_folds`).
FOLDS = _folds()
