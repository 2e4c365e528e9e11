"""Workers announce themselves in Redis, so a client finds them with two reads instead of a broadcast.

A broadcast (``inspect().stats()``) cannot know how many workers will answer,
so it always waits out its whole timeout: about 1.5 s before every run.  Each
worker instead keeps a short-lived registration in the result backend's Redis:
its host name, pool size, the tasks it has, the queues it consumes and, per
queue, the batches it has reserved but not started and those it runs (the
exporter's backlog, orchestrator/exporter.py),
rewritten every :data:`INTERVAL_S` seconds with an expiry of :data:`TTL_S`.
A worker that stops warmly removes it; one that dies drops out once the
expiry passes.  :mod:`orchestrator.discovery` reads them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from workers import connections, keys

logger = logging.getLogger(__name__)

#: Seconds between a worker's refreshes of its registration.
INTERVAL_S = 2.0
#: Seconds a registration outlives its last refresh: a worker killed without warning
#: is no longer listed this long after it died.
TTL_S = 6


def registration(consumer: Any) -> dict[str, Any]:
    """What a worker says of itself."""
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = sorted(q.name for q in task_consumer.queues) if task_consumer is not None else []
    controller = getattr(consumer, "controller", None)
    concurrency = int(
        getattr(controller, "concurrency", 0) or getattr(consumer.pool, "num_processes", 0) or 0
    )
    return {
        "hostname": consumer.hostname,
        "concurrency": concurrency,
        "pid": os.getpid(),
        "queues": queues,
        "tasks": sorted(name for name in consumer.app.tasks if not name.startswith("celery.")),
        **held(),
        "refreshed_at": time.time(),
    }


def held() -> dict[str, dict[str, int]]:
    """This worker's messages by queue: ``reserved`` (prefetched, not started) and ``active`` (running).

    Celery's own bookkeeping in the worker's main process: a request is reserved
    when its message arrives, active once a pool process takes it, and leaves
    both when it is done.
    """
    active = set(worker_state.active_requests)
    reserved: dict[str, int] = {}
    running: dict[str, int] = {}
    for request in list(worker_state.reserved_requests):
        queue = str((request.delivery_info or {}).get("routing_key") or "")
        counts = running if request in active else reserved
        counts[queue] = counts.get(queue, 0) + 1
    return {"reserved": reserved, "active": running}


class Registration(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: keep this worker's registration fresh while it consumes."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        self.refresh(consumer)
        self.timer_entry = consumer.timer.call_repeatedly(INTERVAL_S, self.refresh, (consumer,), priority=10)

    def refresh(self, consumer: Any) -> None:
        try:
            client = connections.backend(consumer.app)
            record = json.dumps(registration(consumer))
            with client.pipeline(transaction=False) as pipe:
                pipe.set(keys.worker(consumer.hostname), record, ex=TTL_S)
                pipe.sadd(keys.WORKERS, consumer.hostname)
                pipe.execute()
        except Exception as exc:  # noqa: BLE001 - never take the worker down for its listing
            logger.warning("could not refresh this worker's registration in Redis: %s", exc)

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        try:
            client = connections.backend(consumer.app)
            client.delete(keys.worker(consumer.hostname))
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            logger.warning("could not remove this worker's registration from Redis: %s", exc)

    shutdown = stop
