"""Sending a job and waiting for its fan-in, always with a bound."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from celery import Celery

from orchestrator.canvas import Job
from workers.errors import InfrastructureError, RunTimeout
from workers.fanin import Outcome
from workers.settings import Settings

#: How long ``workers`` and the pre-flight check wait for replies, seconds.
PING_TIMEOUT = 1.5
#: With no progress for this long, check that some worker still answers.
STALL_CHECK_S = 10.0
#: Seconds between polls: each is two O(1) commands, and a short interval keeps the
#: time between the fan-in and the client noticing it small next to a fast run.
POLL_S = 0.05
#: How long a wait keeps trying a Redis that went away (long enough for a restart).
REDIS_GRACE_S = 30.0
JOB_KEY = "fanout:job:{}"


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def check_redis(settings: Settings) -> None:
    """Raise InfrastructureError, within a few seconds, if Redis does not answer."""
    roles: dict[str, str] = {}
    for name, url in (("broker", settings.broker_url), ("result backend", settings.result_backend)):
        roles[url] = f"{roles[url]} and {name}" if url in roles else name
    # One connection and PING per distinct Redis: broker and backend are usually the same one.
    for url, name in roles.items():
        client = redis.Redis.from_url(
            url, socket_connect_timeout=settings.connect_timeout, socket_timeout=settings.connect_timeout
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            raise InfrastructureError(
                f"cannot reach Redis ({name}) at {_redact(url)}: {exc}. "
                "Start Redis, or point FANOUT_REDIS_URL at a running one."
            ) from None
        finally:
            client.close()


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    concurrency: int


def list_workers(app: Celery, timeout: float = PING_TIMEOUT) -> list[WorkerInfo]:
    """The workers that answer within ``timeout``, with their pool sizes."""
    stats = app.control.inspect(timeout=timeout).stats() or {}
    return sorted(
        (
            WorkerInfo(name, int(s.get("pool", {}).get("max-concurrency", 0) or 0))
            for name, s in stats.items()
        ),
        key=lambda w: w.name,
    )


def require_workers(app: Celery) -> list[WorkerInfo]:
    workers = list_workers(app)
    if not workers:
        raise InfrastructureError(
            f"no worker answered within {PING_TIMEOUT} s. Start one with "
            "`celery -A workers worker`, or try `fanout demo`, which starts its own."
        )
    return workers


def submit(app: Celery, job: Job, expires: int) -> str:
    """Publish the job's chord and record it; return the header's group id.

    The header goes out in bulk (see orchestrator/publish.py: the same messages
    as ``apply_async``, pipelined); the client keeps no subscription to any
    header result.
    """
    from orchestrator.publish import publish_chord

    group_id = publish_chord(app, job.signature)
    record = {**job.record(group_id), "sent_at": time.time()}
    app.backend.client.set(JOB_KEY.format(job.job_id), json.dumps(record), ex=expires)
    return group_id


Progress = Callable[[int, int], None]  # (batches done, batches in all)


def batches_done(app: Celery, group_id: str) -> int:
    """How many header tasks have reported: one ZCARD, whatever the job's size."""
    key = app.backend.get_key_for_group(group_id, ".j")
    return int(app.backend.client.zcard(key))


class Tracked(Protocol):
    """What waiting needs to know about a job: a :class:`~orchestrator.canvas.Job`, or a stored record."""

    @property
    def job_id(self) -> str: ...
    @property
    def total(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def batches(self) -> int: ...


def callback_meta(app: Celery, job_id: str) -> dict[str, Any] | None:
    """The stored state of ``job_id``'s callback, or None while it has none.

    One GET on the backend's client (no retry loop of the backend's own), so
    a dead Redis shows up here at once, as a ``redis.RedisError``.
    """
    raw = app.backend.client.get(app.backend.get_key_for_task(job_id))
    if not raw:
        return None
    meta: dict[str, Any] = app.backend.decode_result(raw)
    return meta


def wait(
    app: Celery, job: Tracked, group_id: str, timeout: float, progress: Progress | None = None
) -> Outcome:
    """Wait for ``job``'s fan-in for at most ``timeout`` seconds.

    Each poll costs two O(1) Redis commands.  If nothing moves for a while and
    no worker answers, the wait ends early with InfrastructureError rather
    than running out the clock in silence.  If Redis goes away, the wait keeps
    trying for up to REDIS_GRACE_S (a restart); once Redis is back it checks
    that the job's state survived (it does not without persistence), and
    says so instead of waiting for a run that can no longer complete.
    """
    start = time.monotonic()
    deadline = start + timeout
    last_done, last_change = -1, start
    lost_since: float | None = None
    done = 0
    while True:
        now = time.monotonic()
        try:
            if lost_since is not None:
                _require_state(app, job, done)
            lost_since = None
            meta = callback_meta(app, job.job_id)
            state = meta["status"] if meta else "PENDING"
            if state in ("SUCCESS", "FAILURE", "REVOKED"):
                break
            done = batches_done(app, group_id)
        except redis.RedisError as exc:
            lost_since = lost_since or now
            if now - lost_since >= REDIS_GRACE_S or now >= deadline:
                raise InfrastructureError(
                    f"lost Redis while waiting for job {job.job_id} and it did not come back within "
                    f"{min(REDIS_GRACE_S, now - start):g} s ({exc}); {_pending(job, done)}. "
                    f"Once Redis is back: `fanout status {job.job_id}`."
                ) from None
            time.sleep(POLL_S * 5)
            continue
        if done != last_done:
            last_done, last_change = done, now
            if progress:
                progress(done, job.batches)
        if now >= deadline:
            raise RunTimeout(
                f"timed out after {timeout:g} s waiting for job {job.job_id}: "
                f"{_pending(job, done)}. The run goes on: `fanout status {job.job_id} --wait` "
                "waits for it again. Raise --timeout, or add workers."
            )
        if now - last_change >= STALL_CHECK_S:
            last_change = now
            try:
                # A restart between two polls raises nothing: check the state is still there.
                _require_state(app, job, done)
                answering = list_workers(app)
            except redis.RedisError:
                continue
            if not answering:
                raise InfrastructureError(
                    f"no worker answers and job {job.job_id} has not moved for "
                    f"{STALL_CHECK_S:g} s: {_pending(job, done)}. Start a worker "
                    f"(`celery -A workers worker`), then `fanout status {job.job_id} --wait`."
                )
        time.sleep(min(POLL_S, max(0.0, deadline - now)))
    assert meta is not None  # the loop ends only on a final state
    if state != "SUCCESS":
        raise InfrastructureError(f"job {job.job_id} ended in {state}: {meta.get('result')!r}")
    if progress:
        progress(job.batches, job.batches)
    outcome: Outcome = meta["result"]
    return outcome


def _require_state(app: Celery, job: Tracked, done: int) -> None:
    """Raise InfrastructureError if Redis no longer holds ``job`` (it restarted without persistence)."""
    if load_record(app, job.job_id) is None:
        raise InfrastructureError(
            f"Redis no longer holds job {job.job_id}: it restarted without persistence (or was "
            f"flushed) and the run's state is gone ({_pending(job, done)} before). "
            "The run cannot complete: send it again."
        )


def _pending(job: Tracked, done: int) -> str:
    items_done = min(job.total, done * job.batch_size)
    return (
        f"{done} of {job.batches} batches done (about {items_done} of {job.total} items), "
        f"{job.batches - done} pending"
    )


def load_record(app: Celery, job_id: str) -> dict[str, Any] | None:
    raw = app.backend.client.get(JOB_KEY.format(job_id))
    return json.loads(raw) if raw else None


def send_job(
    app: Celery,
    job_factory: Callable[[int], Job],
    total: int,
    batch_cap: int,
    batch_size: int | None,
) -> tuple[Job, str, float]:
    """Check Redis and workers, build the job and send it.

    Returns the job, its header's group id, and ``time.perf_counter()`` just before sending.
    """
    from orchestrator.canvas import auto_batch_size
    from workers.settings import get_settings

    settings = get_settings()
    check_redis(settings)
    workers = require_workers(app)
    processes = sum(w.concurrency for w in workers) or 1
    job = job_factory(batch_size or auto_batch_size(total, processes, batch_cap))
    started = time.perf_counter()
    return job, submit(app, job, settings.result_expires), started


def run_job(
    app: Celery,
    job_factory: Callable[[int], Job],
    total: int,
    batch_cap: int,
    batch_size: int | None,
    timeout: float,
    show_progress: bool,
    label: str,
) -> tuple[Outcome, float]:
    """Send the job (:func:`send_job`) and wait for its fan-in.

    Returns the outcome and the seconds from sending to fan-in.
    """
    from orchestrator.render import progress_bar

    job, group_id, started = send_job(app, job_factory, total, batch_cap, batch_size)
    with progress_bar(show_progress, label, total, job.batch_size) as update:
        outcome = wait(app, job, group_id, timeout, update)
    return outcome, time.perf_counter() - started
