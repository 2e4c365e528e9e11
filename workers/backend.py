"""The result backend: Celery's Redis (or Sentinel) backend, its chord count riding out a Redis restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery.backends.redis import RedisBackend, SentinelBackend
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers import keys
from workers.connections import following

logger = logging.getLogger(__name__)

#: How long a worker keeps retrying Redis for one operation (a restart takes seconds).
RETRY_FOR_S = 60.0
#: Errors that mean "Redis is not there right now" rather than "this is wrong".
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

T = TypeVar("T")


def retrying(operation: Callable[[], T], what: str, retry_for: float = RETRY_FOR_S) -> T:
    """Run ``operation``, retrying while Redis is down, for at most ``retry_for`` seconds."""
    deadline = time.monotonic() + retry_for
    pause = 0.2
    while True:
        try:
            return operation()
        except REDIS_DOWN as exc:
            if time.monotonic() + pause > deadline:
                raise
            logger.warning("Redis unavailable during %s (%s); retrying in %.1f s", what, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


class RetryingChordMixin:
    """A header's report to its chord is retried while Redis is down, and marked in the job's
    done bitmap once the chord has it.

    Unretried, a chord part reported during a Redis restart (or a Sentinel
    failover) raises, Celery then marks the header FAILED, and one failed
    header fails the whole chord.  The report is a Lua script that counts each
    task id once, so sending it again is safe.  The done bitmap (``keys.done``)
    is what the healer reads to know which batches the chord has counted; it is
    set after the report, so a batch marked done is always counted, and before
    the message is acknowledged, so a batch is always in one of the broker's
    places or done.
    """

    client: Any
    expires: Any

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        returned = retrying(
            lambda: super(RetryingChordMixin, self).on_chord_part_return(  # type: ignore[misc]
                request, state, result, **kwargs
            ),
            f"the chord report of {request.id}",
        )
        group, index = getattr(request, "group", None), getattr(request, "group_index", None)
        if group and index is not None:
            retrying(
                lambda: mark_done(self.client, str(group), [int(index)], self.expires), "marking a batch done"
            )
        return returned


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
