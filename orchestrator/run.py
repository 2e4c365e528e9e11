"""Sending a job and waiting for its fan-in, always with a bound."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult

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
JOB_KEY = "fanout:job:{}"


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def check_redis(settings: Settings) -> None:
    """Raise InfrastructureError, within a few seconds, if Redis does not answer."""
    for name, url in (("broker", settings.broker_url), ("result backend", settings.result_backend)):
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
    app.backend.client.set(JOB_KEY.format(job.job_id), json.dumps(job.record(group_id)), ex=expires)
    return group_id


Progress = Callable[[int, int], None]  # (batches done, batches in all)


def batches_done(app: Celery, group_id: str) -> int:
    """How many header tasks have reported: one ZCARD, whatever the job's size."""
    key = app.backend.get_key_for_group(group_id, ".j")
    return int(app.backend.client.zcard(key))


def wait(app: Celery, job: Job, group_id: str, timeout: float, progress: Progress | None = None) -> Outcome:
    """Wait for ``job``'s fan-in for at most ``timeout`` seconds.

    Each poll costs two O(1) Redis commands.  If nothing moves for a while and
    no worker answers, the wait ends early with InfrastructureError rather
    than running out the clock in silence.
    """
    result = AsyncResult(job.job_id, app=app)
    start = time.monotonic()
    deadline = start + timeout
    last_done, last_change = -1, start
    try:
        while True:
            state = result.state
            if state in ("SUCCESS", "FAILURE", "REVOKED"):
                break
            done = batches_done(app, group_id)
            now = time.monotonic()
            if done != last_done:
                last_done, last_change = done, now
                if progress:
                    progress(done, job.batches)
            if now >= deadline:
                raise RunTimeout(
                    f"timed out after {timeout:g} s waiting for job {job.job_id}: "
                    f"{_pending(job, done)}. Raise --timeout, or add workers."
                )
            if now - last_change >= STALL_CHECK_S:
                last_change = now
                if not list_workers(app):
                    raise InfrastructureError(
                        f"no worker answers and job {job.job_id} has not moved for "
                        f"{STALL_CHECK_S:g} s: {_pending(job, done)}. Start a worker "
                        "(`celery -A workers worker`)."
                    )
            time.sleep(min(POLL_S, max(0.0, deadline - now)))
    except redis.RedisError as exc:
        raise InfrastructureError(f"lost Redis while waiting for job {job.job_id}: {exc}") from None
    if state != "SUCCESS":
        raise InfrastructureError(f"job {job.job_id} ended in {state}: {result.result!r}")
    if progress:
        progress(job.batches, job.batches)
    outcome: Outcome = result.result
    return outcome


def _pending(job: Job, done: int) -> str:
    items_done = min(job.total, done * job.batch_size)
    return (
        f"{done} of {job.batches} batches done (about {items_done} of {job.total} items), "
        f"{job.batches - done} pending"
    )


def load_record(app: Celery, job_id: str) -> dict[str, Any] | None:
    raw = app.backend.client.get(JOB_KEY.format(job_id))
    return json.loads(raw) if raw else None


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
    """Check Redis and workers, build the job, send it and wait for its fan-in.

    Returns the outcome and the seconds from sending to fan-in.
    """
    from orchestrator.canvas import auto_batch_size
    from orchestrator.render import progress_bar
    from workers.settings import get_settings

    settings = get_settings()
    check_redis(settings)
    workers = require_workers(app)
    processes = sum(w.concurrency for w in workers) or 1
    size = batch_size or auto_batch_size(total, processes, batch_cap)
    job = job_factory(size)
    started = time.perf_counter()
    group_id = submit(app, job, settings.result_expires)
    with progress_bar(show_progress, label, total, size) as update:
        outcome = wait(app, job, group_id, timeout, update)
    return outcome, time.perf_counter() - started
