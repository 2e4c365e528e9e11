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

And an acknowledgement costs no round trip of its own: kombu removes an acked
message from the ``unacked`` index and hash at once, a Redis round trip that the
worker's main process waits for after every task (on a worker on another machine,
a good part of what a short task costs: docs/performance.md).  Here :meth:`QoS.ack`
forgets the message at once (it no longer counts against the prefetch) and its
removal goes with the next write of that QoS, the record of the next message taken
(:meth:`QoS.append`), or at the latest :data:`ACKS_EVERY_S` later, and before the
channel closes.  A worker killed in between leaves the message in ``unacked``, and
it runs again after the visibility timeout, as a message whose worker died just
before its ack always has (items may run more than once; the chord counts each
batch once).

``QoS.append``, ``ack``, ``restore_by_tag``, ``restore_unacked_once`` and
``pipe_or_acquire`` are the transport's methods, called with the same arguments by
kombu 5.7 (pinned in ``pyproject.toml``); each override calls the original.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

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


#: The longest an acknowledged message waits for its removal from ``unacked`` to be sent, seconds.
ACKS_EVERY_S = 0.1
#: The QoS objects of this process, whose pending acknowledgements the event loop sends.
_LIVE: weakref.WeakSet[QoS] = weakref.WeakSet()


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, waiting for room when Redis is full instead of dropping the message taken,
    and sending acknowledgements with its next write instead of one round trip each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.pending_acks: list[Any] = []
        _LIVE.add(self)

    def ack(self, delivery_tag: Any) -> None:
        self.pending_acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]  # kombu's, minus the round trip

    @contextlib.contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        """kombu's pipeline for a write of this QoS; a new one starts with the pending acknowledgements."""
        if pipe is not None:
            yield pipe
            return
        acks, self.pending_acks = self.pending_acks, []
        with super().pipe_or_acquire(None, client) as fresh:
            for tag in acks:
                fresh.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag)
            try:
                yield fresh
            except BaseException:
                self.pending_acks[:0] = acks  # not sent: they go with the next write
                raise

    def send_acks(self) -> None:
        """Send the pending acknowledgements now (one round trip), if there are any."""
        if self.pending_acks:
            with self.pipe_or_acquire() as pipe:
                pipe.execute()

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        with contextlib.suppress(redis.RedisError):  # a Redis gone: they run again, as unacked
            self.send_acks()
        return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]

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


def send_acks() -> None:
    """Send every QoS's pending acknowledgements (the event loop calls this every ACKS_EVERY_S)."""
    for qos in list(_LIVE):
        if getattr(qos.channel, "closed", False):  # its close sent them, or could not
            _LIVE.discard(qos)
            continue
        try:
            qos.send_acks()
        # Kept: they go with the next write that succeeds, or run again.  AttributeError: kombu's
        # channel of a connection just lost (see docs/failures.md, the loss of the master).
        except (redis.RedisError, OSError, AttributeError) as exc:
            logger.debug("%d acknowledgement(s) not sent yet: %r", len(qos.pending_acks), exc)


class _SendsAcks:
    """A transport whose event loop sends the pending acknowledgements every ACKS_EVERY_S."""

    #: The event loop's timer that does it (one per process: a new connection replaces it).
    acks_timer: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        if _SendsAcks.acks_timer is not None:
            _SendsAcks.acks_timer.cancel()
        _SendsAcks.acks_timer = loop.call_repeatedly(ACKS_EVERY_S, send_acks)


class Transport(_SendsAcks, kombu_redis.Transport):
    """kombu's Redis transport with :class:`QoS`; a refused write is recoverable, not fatal."""

    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, redis.OutOfMemoryError)


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(_SendsAcks, kombu_redis.SentinelTransport):
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
