"""The result backend: Celery's Redis (or Sentinel) backend, its chord count riding out a Redis restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
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
    """

    client: Any
    expires: Any

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Celery's own retries of a result it stores (``result_backend_always_retry``) cover a full
        Redis too: the chord callback's outcome is written once, after the parts it merged are gone."""
        return isinstance(exc, REDIS_FULL) or bool(super().exception_safe_to_retry(exc))  # type: ignore[misc]

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        what = f"the chord report of {request.id}"
        with softlimit.held(what):
            returned = retrying(
                lambda: super(RetryingChordMixin, self).on_chord_part_return(  # type: ignore[misc]
                    request, state, result, **kwargs
                ),
                what,
            )
            group, index = getattr(request, "group", None), getattr(request, "group_index", None)
            if group and index is not None:
                retrying(
                    lambda: mark_done(self.client, str(group), [int(index)], self.expires),
                    "marking a batch done",
                )
            replicated(self.client, what)
            return returned

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
    key = keys.done(group_id)
    with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.setbit(key, index, 1)
        if expires:
            pipe.expire(key, int(expires))
        pipe.execute()
