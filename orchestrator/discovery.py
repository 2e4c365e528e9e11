"""Finding the workers: their registrations in Redis, read with two commands (no broadcast wait).

Workers write them (:mod:`workers.registration`); a registration expires a few
seconds after its worker stops refreshing it, so a dead worker drops out on
its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from workers import connections, keys
from workers.errors import InfrastructureError
from workers.registration import TTL_S


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    concurrency: int
    tasks: frozenset[str] = field(default_factory=frozenset)
    queues: tuple[str, ...] = ()

    def has(self, task: str) -> bool:
        return task in self.tasks


def list_workers(app: Celery, queue: str | None = None) -> list[WorkerInfo]:
    """The workers registered now (those consuming ``queue``, if given), sorted by name."""
    client = connections.backend(app)
    names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in client.smembers(keys.WORKERS))
    if not names:
        return []
    records = client.mget([keys.worker(name) for name in names])
    gone = [name for name, raw in zip(names, records, strict=True) if raw is None]
    if gone:
        client.srem(keys.WORKERS, *gone)  # expired registrations: their workers stopped or died
    found = [_info(json.loads(raw)) for raw in records if raw is not None]
    return [w for w in found if queue is None or queue in w.queues]


def _info(record: dict[str, Any]) -> WorkerInfo:
    return WorkerInfo(
        name=str(record["hostname"]),
        concurrency=int(record.get("concurrency") or 0),
        tasks=frozenset(record.get("tasks") or ()),
        queues=tuple(record.get("queues") or ()),
    )


def require_workers(app: Celery, tasks: Iterable[str] = (), queue: str | None = None) -> list[WorkerInfo]:
    """The workers consuming ``queue`` that have every task in ``tasks``.

    InfrastructureError, naming what is missing, if there are none.
    """
    found = list_workers(app, queue)
    if not found:
        where = f" on queue {queue}" if queue else ""
        others = len(list_workers(app)) if queue else 0
        elsewhere = f" ({others} consume other queues: check FANOUT_QUEUE)" if others else ""
        raise InfrastructureError(
            f"no worker is running{where} (none registered in Redis in the last {TTL_S} s){elsewhere}. "
            "Start one with `fanout worker` (or `celery -A workers worker`), "
            "or try `fanout demo`, which starts its own."
        )
    able = found
    for name in tasks:
        able = [w for w in able if w.has(name)]
        if not able:
            raise InfrastructureError(
                f"no worker has task {name} (set FANOUT_IMPORTS on the workers, or start them with "
                f"`fanout worker --import MODULE`); {len(found)} worker(s) running; nothing was sent"
            )
    return able
