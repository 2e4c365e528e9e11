"""Room in Redis, seen from the client: refuse a job that would not fit; name a full Redis as a stall's cause.

A Redis at its ``maxmemory`` under ``noeviction`` refuses the writes a job
needs (its workers' parts, their registrations, the chord's count) and serves
the rest.  The workers wait for room (:mod:`workers.broker`), so a job that
stalls for that reason looks like one whose workers are gone: this says which
it is.  Before sending, :func:`require_room` refuses a job whose estimated
footprint is more than Redis has left.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from celery import Celery

from orchestrator.plan import Plan
from workers import connections, keys
from workers.errors import InfrastructureError
from workers.memory import REMEDY, RedisMemory, is_full, megabytes, read_memory

#: What each batch costs Redis besides its items: a header message's envelope (measured: a
#: message of 100 small ints takes 3.2 KB in the queue's list, 2.4 KB of it the envelope) and
#: its part's framing in the chord's join.
PER_BATCH_B = 2600


def footprint(job: Plan, batches: int) -> int:
    """An estimate of the Redis memory ``job``, sent as ``batches`` batches, needs while it runs, in bytes.

    By reference (``job.spec.where``), only a message and a reference per batch.  Otherwise its
    items travel in the messages (base64: 4/3 of their JSON), are kept compressed for
    ``fanout retry`` (about a third), and its parts take their place in the chord's join
    as the batches finish; a result is taken to be as large as its input.  For a job whose
    results are larger it is too low, and Redis can still fill up while the job runs: its
    workers then wait for room and the waiting client says so (:func:`stall_cause`).
    """
    if job.spec.where is not None:
        return batches * PER_BATCH_B
    size = len(json.dumps(list(job.items), separators=(",", ":"), default=str))
    return size * 4 // 3 + size // 3 + batches * PER_BATCH_B


def _clients(app: Celery) -> list[tuple[str, Any]]:
    """The Redis clients of the result backend and (if another one) the broker, with their roles."""
    broker = str(app.conf.broker_url or "")
    backend = str(app.conf.result_backend or "")
    if backend.endswith(broker):
        return [("broker and result backend", connections.backend(app))]
    if not broker.startswith(("redis://", "rediss://")):
        return [("result backend", connections.backend(app))]
    return [
        ("result backend", connections.backend(app)),
        ("broker", redis.Redis.from_url(broker, socket_connect_timeout=3, socket_timeout=3)),
    ]


def _memory(app: Celery, probe: bool = False) -> list[tuple[str, RedisMemory]]:
    """Each Redis's memory figures; with ``probe``, only those that refuse a write now."""
    found: list[tuple[str, RedisMemory]] = []
    for role, client in _clients(app):
        memory = read_memory(client)
        if memory is not None and (not probe or (memory.refuses_writes and _refuses_a_write(client))):
            found.append((role, memory))
        if role == "broker":
            client.close()
    return found


def _refuses_a_write(client: Any) -> bool:
    """Whether Redis refuses a small write for want of memory now: near its limit is not yet full."""
    try:
        client.set(keys.ROOM_PROBE, "1", px=1000)
    except redis.RedisError as exc:
        return is_full(exc)
    return False


def require_room(app: Celery, job: Plan, batches: int) -> None:
    """InfrastructureError, before anything is sent, if ``job`` would not fit in Redis's maxmemory."""
    need = footprint(job, batches)
    for role, memory in _memory(app):
        free = memory.free
        if free is not None and memory.policy == "noeviction" and need > free:
            raise InfrastructureError(
                f"job {job.job_id} would not fit in Redis ({role}): it needs at least {megabytes(need)} "
                f"and Redis has {megabytes(free)} left ({memory}); nothing was sent. Send it by "
                "reference (FANOUT_BY_REFERENCE_ITEMS, with a FANOUT_RESULTS_URL every worker shares), "
                "or make room: " + REMEDY
            )


def stall_cause(app: Celery, job_id: str, pending: str) -> str | None:
    """Why a job that has not moved cannot finish, if the reason is a full Redis; else None."""
    for role, memory in _memory(app, probe=True):
        return full_redis_message(job_id, role, memory, pending)
    return None


def full_redis_message(job_id: str, role: str, memory: RedisMemory, pending: str) -> str:
    """The one line a client ends with when Redis is full."""
    return (
        f"job {job_id} cannot finish: Redis ({role}) is full, {memory}, and refuses the writes "
        f"the job needs; {pending}. The workers wait for room and lose nothing: {REMEDY}; "
        f"then `fanout status {job_id} --wait`."
    )
