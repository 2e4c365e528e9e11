"""The broker: kombu's Redis transport, except that a full Redis is waited out instead of ending the worker.

kombu's Redis transport takes a message with ``BRPOP`` (which a full Redis
still serves: it frees memory) and then records it as unacknowledged with
``ZADD``/``HSET`` in one transaction (``QoS.append``), which a Redis at its
``maxmemory`` under ``noeviction`` refuses.  Unhandled, that
``OutOfMemoryError`` ends the worker (``Unrecoverable error``), and the
message it had just taken is in no list and no hash: lost.

Here the transport's own extension points are used, as its authors intend
(a ``Transport`` whose ``Channel`` has another ``QoS``), registered under kombu's
own scheme names (:func:`install`, called by :mod:`workers.app`):

* :meth:`QoS.append` keeps the message in hand and retries the record with
  back-off until Redis has room, logging Redis's memory figures; only a
  worker asked to shut down meanwhile gives the message up (the job's healing
  or ``fanout retry`` brings its items back);
* :meth:`QoS.restore_by_tag` (a requeue, the sweep for expired messages, a
  shutdown) leaves a message it cannot put back in the ``unacked`` hash, where
  the next sweep finds it, instead of raising (the transaction changed nothing);
* ``connection_errors`` includes ``OutOfMemoryError``: any other write a full
  Redis refuses in the worker's main process restarts its consumer, as a
  lost connection does, rather than ending it.

``QoS.append`` and ``restore_by_tag`` are the transport's methods, called
with the same arguments by kombu 5.7 (pinned in ``pyproject.toml``); each
override calls the original.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from workers.memory import REMEDY, full_message, is_full

logger = logging.getLogger(__name__)

#: The first and the longest pause between two tries of a write Redis refused for want of memory.
FIRST_PAUSE_S = 0.5
MAX_PAUSE_S = 5.0
#: While it waits, a worker says so again this often (seconds): one line, not one per try.
LOG_EVERY_S = 30.0


def _stopping() -> bool:
    """Whether this worker has been asked to shut down (warm or cold)."""
    from celery.worker import state

    return any(getattr(state, flag, None) is not None for flag in ("should_stop", "should_terminate"))


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, waiting for room when Redis is full instead of dropping the message taken."""

    def append(self, message: Any, delivery_tag: Any) -> Any:
        pause, logged_at, started = FIRST_PAUSE_S, float("-inf"), time.monotonic()
        while True:
            try:
                return super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            except redis.RedisError as exc:
                if not is_full(exc):
                    raise
                task_id = (getattr(message, "headers", None) or {}).get("id", delivery_tag)
                if _stopping():
                    logger.error(
                        "%s; shutting down, so message %s (taken from the queue, never recorded) is "
                        "given up: the job's healing or `fanout retry` brings its items back",
                        full_message(self.channel.client, "recording a message as delivered"),
                        task_id,
                    )
                    raise
                now = time.monotonic()
                if now - logged_at >= LOG_EVERY_S:
                    logged_at = now
                    logger.warning(
                        "%s; holding message %s and trying again every %g s at most until it has room "
                        "(waiting %.0f s so far): %s",
                        full_message(self.channel.client, "recording a message as delivered"),
                        task_id, MAX_PAUSE_S, now - started, REMEDY,
                    )  # fmt: skip
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE_S)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> Any:
        try:
            return super().restore_by_tag(tag, client=client, leftmost=leftmost)  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            if not is_full(exc):
                raise
            # The transaction changed nothing: the message is still in `unacked`, and the
            # sweep for messages past the visibility timeout puts it back once Redis has room.
            logger.warning(
                "%s; message %s stays in the unacked hash until a later sweep puts it back",
                full_message(self.channel.client, "putting a message back on its queue"),
                tag,
            )
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`QoS`; a refused write is recoverable, not fatal."""

    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, redis.OutOfMemoryError)


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):
    """The same for a Redis found through Sentinel (``sentinel://`` URLs)."""

    Channel = SentinelChannel
    connection_errors = (*kombu_redis.SentinelTransport.connection_errors, redis.OutOfMemoryError)


#: kombu's names for the Redis transports (the URL schemes), and fanout's in their place.
#: A ``redis+socket://`` URL names kombu's transport class in itself: it keeps kombu's.
ALIASES = {
    "redis": f"{__name__}:Transport",
    "rediss": f"{__name__}:Transport",
    "sentinel": f"{__name__}:SentinelTransport",
}


def install() -> None:
    """Make kombu's ``redis``, ``rediss`` and ``sentinel`` schemes name fanout's transports.

    Under kombu's own names (``kombu.transport.TRANSPORT_ALIASES``, where kombu looks a
    URL's scheme up), not through Celery's ``broker_transport``: a connection then still
    reports its scheme, which Flower's Broker page and ``Connection.as_uri()`` build on
    (a class path there made Flower answer 404), and kombu's switch to the next Sentinel,
    which resolves the scheme again, keeps fanout's transport.
    """
    from kombu import transport

    transport.TRANSPORT_ALIASES.update(ALIASES)
