"""The worker's consumer: Celery's, except that task events go out in bunches, not one a task.

Celery buffers a worker's task events (received, started, succeeded...) and
publishes what it holds at the event loop's next turn: in practice about one
``PUBLISH`` for each event, each a Redis round trip that the worker's main
process waits for, between fetching and acknowledging messages.  On a worker
on another machine, those waits are most of what a short task costs
(docs/performance.md, "Workers on other machines").

Here the buffer is published :data:`EVENTS_EVERY_S` after its first event
instead (or at once when it holds Celery's ``buffer_limit`` of them), as one
``task.multi`` event, which Flower and ``celery events`` read as Celery sends
it.  Events are late by that much at most; the buffer is flushed before the
consumer stops, so a worker's last events are not lost.

``on_send_event_buffered`` is the hook Celery 5.7's ``Events`` step hands the
dispatcher (pinned in ``pyproject.toml``); with a Celery that no longer calls
it, events go out as Celery sends them.
"""

from __future__ import annotations

import contextlib

from celery.worker.consumer import Consumer as CeleryConsumer

#: How long a task event may wait in the buffer for others to go with it, seconds.
EVENTS_EVERY_S = 0.1


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, publishing buffered task events at most every :data:`EVENTS_EVERY_S`."""

    _events_due: bool = False

    def on_send_event_buffered(self) -> None:
        if not self.hub:
            return
        if not self._events_due:
            self._events_due = True
            self.hub.call_later(EVENTS_EVERY_S, self._send_buffered_events)

    def _send_buffered_events(self) -> None:
        self._events_due = False
        self._flush_events()

    def stop(self) -> None:
        self._flush_before_stopping()
        super().stop()

    def shutdown(self) -> None:
        self._flush_before_stopping()
        super().shutdown()

    def _flush_before_stopping(self) -> None:
        # Best effort, as Celery's own flush: a Redis gone away loses the events, not the worker.
        with contextlib.suppress(Exception):
            self._flush_events()
