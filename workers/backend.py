"""The result backend: Celery's Redis (or Sentinel) backend, its chord count riding out a Redis restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery.backends.redis import RedisBackend, SentinelBackend

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
    """A header's report to its chord is retried while Redis is down.

    Unretried, a chord part reported during a Redis restart (or a Sentinel
    failover) raises, Celery then marks the header FAILED, and one failed
    header fails the whole chord.  The report is a Lua script that counts each
    task id once, so sending it again is safe.
    """

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        return retrying(
            lambda: super(RetryingChordMixin, self).on_chord_part_return(  # type: ignore[misc]
                request, state, result, **kwargs
            ),
            f"the chord report of {request.id}",
        )


class RetryingRedisBackend(RetryingChordMixin, RedisBackend):  # type: ignore[misc]
    """Celery's Redis backend, except that a header's report to its chord is retried while Redis is down."""


class RetryingSentinelBackend(RetryingChordMixin, SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel backend (the master the Sentinels name), with the same retried chord report."""
