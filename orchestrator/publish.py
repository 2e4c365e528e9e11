"""Publishing a chord's header in bulk: the same messages Celery sends, far fewer round trips.

``chord.apply_async()`` publishes its header one task at a time: each goes
through ``Task.apply_async`` -> ``send_task`` -> ``Producer.publish``, builds a
printable ``argsrepr`` of every argument list, opens a Redis client for its
LPUSH and subscribes the client to the task's result.  Measured here, that is
about 0.4 ms of client CPU per message (2,400 messages/s at best).

:func:`publish_chord` sends the same chord with the same guarantees:

* each message is built by Celery's own protocol builder (``amqp.as_task_v2``)
  and framed by the kombu channel's own helpers, so a worker sees exactly
  what ``apply_async`` would have sent (the chord callback in every header
  message, group id and index, time limits, JSON only);
* the chord size is recorded in the result backend *before* any header
  message is visible, as ``group._apply_tasks`` does;
* the messages are LPUSHed through a non-transactional pipeline, ``chunk``
  at a time: one round trip per chunk instead of one per message;
* the client subscribes to no header result (it waits on the callback alone).

A failed pipeline raises; the header may then be partly published, which
leaves the chord incomplete exactly as a broker failure half-way through
``apply_async`` would, and the wait reports it instead of hanging.

The framing uses private helpers of kombu's Redis channel (``_lookup``,
``_inplace_augment_message``, ``_q_for_pri``), pinned to the kombu minor
version the tests ran (pyproject.toml).  Their presence and parameters are
checked at run time: where one is missing or has another shape (another kombu),
the chord goes through Celery's own ``apply_async``, slower but public, and
the reason is logged once per process.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery, chord
from celery.canvas import Signature
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps

#: Messages per pipeline round trip: large enough to amortise the round trip,
#: small enough that the pipeline's buffer stays a few megabytes.
DEFAULT_CHUNK = 500


def header_of(signature: Signature) -> tuple[list[Signature], Signature]:
    """The header task signatures and the callback of a chord signature."""
    return list(signature.tasks), signature.body


def _argsrepr(args: Sequence[Any]) -> str:
    """A short printable form of a header task's arguments, for Flower and the logs.

    Celery's default ``saferepr`` of every argument list costs the client
    time proportional to the batch (the dominant publishing cost for large
    batches); the start index and item count say what a person needs.
    """
    shown = [a if not isinstance(a, list | tuple) else f"<{len(a)} items>" for a in args]
    return "(" + ", ".join(str(s) for s in shown) + ")"


#: Signature options the bulk path carries over; a header using any other (countdown,
#: queue, priority, links...) is sent by Celery's own ``apply_async`` instead.
_BULK_OPTIONS = frozenset({"ignore_result", "task_id", "time_limit", "soft_time_limit"})


def bulk_supported(app: Celery, header: Sequence[Signature]) -> bool:
    """Whether the bulk path sends exactly what ``apply_async`` would for ``header``.

    True for fanout's own jobs: one task name, routed to a plain direct queue
    without priorities, no per-task options beyond those in ``_BULK_OPTIONS``.
    """
    if not header or len({sig.task for sig in header}) != 1:
        return False
    if any(set(sig.options) - _BULK_OPTIONS or sig.kwargs for sig in header):
        return False
    queue = app.amqp.router.route({}, header[0].task, (), {})["queue"]
    return bool(queue.exchange.type == "direct" and not queue.max_priority)


def frozen_callback(callback: Signature, group_id: str) -> dict[str, Any]:
    """The chord callback as every header message of group ``group_id`` carries it.

    As chord.run does: the callback learns its group before it is embedded.
    """
    body = callback.clone()
    body.freeze(body.options.get("task_id"), group_id=group_id)
    return dict(body)


def task_limits(app: Celery, name: str) -> tuple[Any, Any]:
    """Task ``name``'s (hard, soft) time limits: its own when it sets them, else the app's,
    as Task.apply_async does."""
    task = app.tasks.get(name)
    return (
        getattr(task, "time_limit", None) or app.conf.task_time_limit,
        getattr(task, "soft_time_limit", None) or app.conf.task_soft_time_limit,
    )


def _apply_async(app: Celery, signature: Signature, before: Callable[[str], None] | None = None) -> str:
    """Celery's own path, for a header the bulk path does not cover, under the group id
    ``before`` was told."""
    group_id = str(uuid.uuid4())
    if before is not None:
        before(group_id)
    # chord.apply_async makes the header group from the list of its tasks, with the chord's
    # own task_id as the group's id; the callback keeps its own (the job's id), passed apart.
    chorded = chord(list(signature.tasks), signature.body, app=app)
    chorded.options["task_id"] = group_id
    result = chorded.apply_async(task_id=signature.body.options.get("task_id"))
    if str(result.parent.id) != group_id:  # another Celery: the budget and inputs are not its
        raise RuntimeError(f"Celery sent the chord as group {result.parent.id}, not {group_id}")
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None:
        # As before: the header results go to the callback, not to the client.
        for child in result.parent.results:
            consumer.cancel_for(child.id)
    return group_id


def publish_chord(
    app: Celery,
    signature: Signature,
    chunk: int = DEFAULT_CHUNK,
    before: Callable[[str], None] | None = None,
) -> str:
    """Publish the chord ``signature`` (a group of task signatures and a callback); return its group id.

    The callback keeps the task id set on it (the job id), which is what the
    orchestrator waits on.  ``before(group_id)`` runs before any header message
    is sent (what a header task may need to find in Redis).
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    header, callback = header_of(signature)
    if not bulk_supported(app, header):
        return _apply_async(app, signature, before)
    redis_key = bulk_queue_key(app, header[0].task)
    if redis_key is None:
        return _apply_async(app, signature, before)
    group_id = str(uuid.uuid4())
    if before is not None:
        before(group_id)
    # The chord counts its header tasks from here; set before any of them can finish.
    app.backend.set_chord_size(group_id, len(header))
    with HeaderSender(app, header[0].task, group_id, frozen_callback(callback, group_id), chunk) as sender:
        for index, sig in enumerate(header):
            sender.send(index, sig.options.get("task_id") or str(uuid.uuid4()), tuple(sig.args), sig.options)
    return group_id


class HeaderSender:
    """Header messages of one chord group, sent one by one and pushed ``chunk`` at a time.

    The bulk path: each message built by Celery's ``amqp.as_task_v2`` and framed by
    kombu's channel helpers, LPUSHed through a non-transactional pipeline.  With
    ``bulk=False`` (a kombu whose helpers have another shape, see :func:`bulk_queue_key`)
    each message goes through Celery's public ``send_task`` instead, with the same
    group, index and callback.  Used as a context manager: leaving it sends the rest.
    """

    def __init__(
        self,
        app: Celery,
        task: str,
        group_id: str,
        callback: dict[str, Any],
        chunk: int = DEFAULT_CHUNK,
        bulk: bool = True,
    ) -> None:
        self.app, self.task, self.group_id, self.callback, self.chunk = app, task, group_id, callback, chunk
        self.limits = task_limits(app, task)
        self.redis_key = bulk_queue_key(app, task) if bulk else None
        self.queue = str(app.amqp.router.route({}, task, (), {})["queue"].name)
        self.pending = 0
        self._connection: Any = None
        self._channel: Any = None
        self._pipe: Any = None

    def __enter__(self) -> HeaderSender:
        if self.redis_key is not None:
            self._connection = self.app.connection_for_write()
            self._channel = self._connection.default_channel
            with self._channel.conn_or_acquire() as client:
                self._pipe = client.pipeline(transaction=False)
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            if kind is None:
                self.flush()
        finally:
            if self._connection is not None:
                self._connection.release()

    def send(
        self, index: int, task_id: str, args: tuple[Any, ...], options: dict[str, Any] | None = None
    ) -> None:
        """Send header task ``index`` of the group (pushed with the next chunk on the bulk path)."""
        options = options or {}
        time_limit = options.get("time_limit", self.limits[0])
        soft_time_limit = options.get("soft_time_limit", self.limits[1])
        ignore_result = bool(options.get("ignore_result", False))
        if self.redis_key is None:
            self.app.send_task(
                self.task,
                args=args,
                task_id=task_id,
                group_id=self.group_id,
                group_index=index,
                chord=self.callback,
                time_limit=time_limit,
                soft_time_limit=soft_time_limit,
                ignore_result=ignore_result,
                argsrepr=_argsrepr(args),
                kwargsrepr="{}",
            )
            return
        amqp, channel = self.app.amqp, self._channel
        headers, properties, payload, _ = amqp.as_task_v2(
            task_id,
            self.task,
            args,
            {},
            group_id=self.group_id,
            group_index=index,
            chord=self.callback,
            reply_to=self.app.thread_oid,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            ignore_result=ignore_result,
            argsrepr=_argsrepr(args),
            kwargsrepr="{}",
        )
        content_type, content_encoding, data = serialize(payload, serializer="json")  # type: ignore[no-untyped-call]
        properties["delivery_mode"] = 2  # persistent, as Celery's default
        message = channel.prepare_message(data, 0, content_type, content_encoding, headers, properties)
        # Celery publishes to a direct exchange's queue through the anonymous exchange:
        # base64 body, delivery tag and delivery info, as basic_publish frames it.
        channel._inplace_augment_message(message, "", self.queue)
        self._pipe.lpush(self.redis_key, json_dumps(message))  # type: ignore[no-untyped-call]
        self.pending += 1
        if self.pending >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Push the messages sent so far (one round trip)."""
        if self._pipe is not None and self.pending:
            self._pipe.execute()
        self.pending = 0


# --- the check on kombu's private helpers -------------------------------------------------

log = logging.getLogger(__name__)

#: The kombu channel methods the bulk path calls, with the leading parameters it passes.
CHANNEL_HELPERS: dict[str, tuple[str, ...]] = {
    "_lookup": ("exchange", "routing_key"),
    "_inplace_augment_message": ("message", "exchange", "routing_key"),
    "_q_for_pri": ("queue", "pri"),
    "prepare_message": ("body", "priority", "content_type", "content_encoding", "headers", "properties"),
    "conn_or_acquire": ("client",),
}

_fallback_logged = False


def channel_mismatch(channel: Any) -> str | None:
    """Why ``channel`` cannot frame messages for the bulk path, or None when it can.

    Each helper in :data:`CHANNEL_HELPERS` must exist and take the parameters
    the bulk path passes, in that order.
    """
    for name, expected in CHANNEL_HELPERS.items():
        helper = getattr(channel, name, None)
        if not callable(helper):
            return f"kombu's channel has no {name}()"
        try:
            parameters = list(inspect.signature(helper).parameters.values())
        except (TypeError, ValueError):
            return f"kombu's {name}() has no readable signature"
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if positional[: len(expected)] != list(expected):
            return f"kombu's {name}({', '.join(positional)}) is not {name}({', '.join(expected)})"
    return None


def bulk_queue_key(app: Celery, task_name: str) -> str | None:
    """The Redis list the bulk path pushes ``task_name``'s messages to.

    None, logged once per process, where kombu's channel helpers are missing or
    of another shape: the caller then sends the chord through ``apply_async``.
    """
    queue = app.amqp.router.route({}, task_name, (), {})["queue"]
    with app.connection_for_write() as connection:
        key, reason = _bulk_target(connection.default_channel, "", queue.name)
    if reason is not None:
        _log_fallback_once(reason)
    return key


def _bulk_target(channel: Any, exchange: str, routing_key: str) -> tuple[str | None, str | None]:
    """The Redis list the header goes to, or None and the reason the bulk path cannot be used."""
    reason = channel_mismatch(channel)
    if reason is not None:
        return None, reason
    targets = channel._lookup(exchange, routing_key)
    if not (isinstance(targets, list | tuple) and len(targets) == 1):
        return None, f"kombu's _lookup() gave {targets!r}, not one queue"
    redis_key = channel._q_for_pri(targets[0], 0)
    if not isinstance(redis_key, str):
        return None, f"kombu's _q_for_pri() gave {redis_key!r}, not a key"
    return redis_key, None


def _log_fallback_once(reason: str) -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.warning(
            "bulk publishing is off, chords go through apply_async (slower): %s "
            "(kombu %s; fanout was tested with the version pyproject.toml pins)",
            reason,
            _kombu_version(),
        )


def _kombu_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kombu")
    except PackageNotFoundError:
        return "unknown"
