"""Following a sent job to its fan-in, always with a bound.

Following a job is one loop, :func:`follow`: every poll is O(1) Redis commands
(the callback's state and the count of finished batches), it ends early when
nothing moves and no worker is left, and it rides out a Redis restart.  Both
:func:`wait` (the whole outcome) and :func:`parts_as_completed` (results as
batches finish) are built on it.

No task may wait (:func:`refuse_inside_task`): a wait inside a task holds a
pool process while its job's batches queue for one, so it could only end at
the soft time limit.  Celery refuses ``result.get()`` inside a task the same
way, and with the same flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.result import assert_will_not_block
from celery.states import READY_STATES

from orchestrator.discovery import list_workers
from orchestrator.room import stall_cause
from workers import connections, keys
from workers.errors import InfrastructureError, RunTimeout, WaitInsideTask
from workers.fanin import OutcomeDoc, Part, flatten

if TYPE_CHECKING:  # orchestrator.jobs builds on this module
    from orchestrator.jobs import Job

#: With no progress for this long, check that some worker still runs.
STALL_CHECK_S = 10.0
#: Seconds between polls: each is two O(1) commands, and a short interval keeps the
#: time between the fan-in and the client noticing it small next to a fast run.
POLL_S = 0.05
#: How long a wait keeps trying a Redis that went away (long enough for a restart).
REDIS_GRACE_S = 30.0
#: A poll slower than this was an outage ridden out inside the Redis client's own retries
#: (a Sentinel failover: the backend retries each command until the new master answers).
SLOW_POLL_S = 2.0


#: Called with (batches done, batches in all) as a job moves.
ProgressCallback = Callable[[int, int], None]


def batches_done(app: Celery, group_id: str) -> int:
    """How many header tasks have reported: one ZCARD, whatever the job's size."""
    return int(connections.backend(app).zcard(join_key(app, group_id)))


def join_key(app: Celery, group_id: str) -> bytes:
    """Where the chord collects its header parts: a sorted set scored by batch number."""
    key: bytes = app.backend.get_key_for_group(group_id, ".j")
    return key


def callback_meta(app: Celery, job_id: str) -> dict[str, Any] | None:
    """The stored state of ``job_id``'s callback, or None while it has none.

    One GET on the backend's client (no retry loop of the backend's own), so
    a dead Redis shows up here at once, as a ``redis.RedisError``.
    """
    raw = connections.backend(app).get(app.backend.get_key_for_task(job_id))
    if not raw:
        return None
    meta: dict[str, Any] = app.backend.decode_result(raw)
    return meta


def refuse_inside_task(what: str) -> None:
    """Raise WaitInsideTask if this process runs tasks from a pool that a wait would block.

    Celery's own check, ``celery.result.assert_will_not_block``: its flag is set in
    every prefork pool process (and for the solo and threads pools), lifted by
    ``celery.result.allow_join_result()``, and unset in green pools and clients.
    """
    try:
        assert_will_not_block()
    except RuntimeError:
        raise WaitInsideTask(
            f"refused: {what} inside a task, where the wait would need the worker pool "
            "processes that this task holds (the job's batches queue behind it), so it could "
            "only end at the soft time limit. Instead, send the job with fanout.submit(...) and "
            "return its job.id, then fanout.Job.attach(job_id).wait() where the outer job is "
            "waited for; or fold the results on a worker with reduce=."
        ) from None


def follow(app: Celery, job: Job, timeout: float) -> Generator[int, None, OutcomeDoc]:
    """Poll ``job`` until its callback is done; yield the count of finished batches at each poll.

    Returns (as the generator's value) the callback's final state and result.
    Each poll costs two O(1) Redis commands.  If nothing moves for
    STALL_CHECK_S and no worker is running, it raises InfrastructureError
    rather than running out the clock in silence.  If Redis goes away, it
    keeps trying for up to REDIS_GRACE_S (a restart), and an outage, or a poll
    slowed past SLOW_POLL_S by the client's retries (a Sentinel failover), restarts
    the stall clock; once Redis is back it
    checks that the job's state survived (it does not without persistence),
    and says so instead of waiting for a run that can no longer complete.
    Inside a task it raises WaitInsideTask at once (:func:`refuse_inside_task`).
    """
    refuse_inside_task(f"waiting for job {job.job_id}")
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
                # An outage is not the run standing still: the workers get their time to
                # come back and re-register before the stall check looks for them.
                last_change = now
            lost_since = None
            meta = callback_meta(app, job.job_id)
            if meta is not None and meta.get("status") in READY_STATES:
                return _final(job, meta)
            done = batches_done(app, job.group_id)
            if time.monotonic() - now >= SLOW_POLL_S:
                # An outage too, though nothing raised: the workers' registrations may have
                # expired meanwhile, so they get their time to write them again.
                last_change = time.monotonic()
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
        yield done
        if done != last_done:
            last_done, last_change = done, now
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
                _require_healable(app, job, done)
                running = list_workers(app)
            except redis.RedisError:
                continue
            if time.monotonic() - now >= SLOW_POLL_S:
                last_change = time.monotonic()  # an outage mid-check: look again later
                continue
            full = stall_cause(app, job.job_id, _pending(job, done))  # Redis at its maxmemory
            if full is not None:
                raise InfrastructureError(full)
            if not running:
                raise InfrastructureError(
                    f"no worker is running and job {job.job_id} has not moved for "
                    f"{STALL_CHECK_S:g} s: {_pending(job, done)}. Start a worker "
                    f"(`fanout worker`), then `fanout status {job.job_id} --wait`."
                )
        time.sleep(min(POLL_S, max(0.0, deadline - now)))


def _final(job: Job, meta: dict[str, Any]) -> OutcomeDoc:
    state = meta["status"]
    if state != "SUCCESS":
        raise InfrastructureError(f"job {job.job_id} ended in {state}: {meta.get('result')!r}")
    outcome: OutcomeDoc = meta["result"]
    return outcome


def wait(app: Celery, job: Job, timeout: float, progress: ProgressCallback | None = None) -> OutcomeDoc:
    """Wait for ``job``'s fan-in for at most ``timeout`` seconds; see :func:`follow`.

    ``progress`` sees the count of finished batches only grow: the chord deletes
    its join once every batch is in and the callback is sent, so a count that
    drops means every batch is done and the fan-in has begun.
    """
    polls = follow(app, job, timeout)
    last = -1
    try:
        while True:
            polled = next(polls)
            done = job.batches if polled < last else polled
            if progress and done != last:
                progress(min(done, job.batches), job.batches)
            last = done
    except StopIteration as stop:
        outcome: OutcomeDoc = stop.value
    if progress:
        progress(job.batches, job.batches)
    return outcome


#: Past this many gaps between the batches already read, one read of the whole join is cheaper.
MAX_RANGES = 32


def parts_as_completed(app: Celery, job: Job, timeout: float) -> Iterator[Part | OutcomeDoc]:
    """Yield each header part as it lands in the chord's join, then the final outcome.

    Each batch is read once: when the count of finished batches changes, only
    the batch numbers not read yet are fetched (one ZRANGEBYSCORE per gap,
    pipelined).  The chord deletes its join once the callback is sent, so the
    final outcome comes last; it holds every item, including those of parts
    never seen here.
    """
    seen: set[int] = set()
    key = join_key(app, job.group_id)
    polls = follow(app, job, timeout)
    last = 0
    try:
        while True:
            done = next(polls)
            if done == last:
                continue
            last = done
            for number, part in _new_parts(app, key, seen, job.batches):
                seen.add(number)
                yield from flatten([part])
    except StopIteration as stop:
        yield stop.value


def _new_parts(app: Celery, key: bytes, seen: set[int], batches: int) -> Iterable[tuple[int, Part]]:
    gaps = _gaps(seen, batches)
    client = connections.backend(app)
    if len(gaps) > MAX_RANGES:
        rows = client.zrange(key, 0, -1, withscores=True)
    else:
        with client.pipeline(transaction=False) as pipe:
            for low, high in gaps:
                pipe.zrangebyscore(key, low, high, withscores=True)
            rows = [row for found in pipe.execute() for row in found]
    for raw, score in rows:
        number = int(score)
        if number in seen:
            continue
        _, _, state, result = app.backend.decode(raw)
        if state == "SUCCESS" and isinstance(result, dict):
            yield number, result  # type: ignore[misc]


def _gaps(seen: set[int], batches: int) -> list[tuple[int, int]]:
    """The runs of batch numbers in 0..batches-1 not in ``seen``, as (first, last) pairs."""
    gaps: list[tuple[int, int]] = []
    first: int | None = None
    for number in range(batches):
        if number in seen:
            if first is not None:
                gaps.append((first, number - 1))
                first = None
        elif first is None:
            first = number
    if first is not None:
        gaps.append((first, batches - 1))
    return gaps


def _require_state(app: Celery, job: Job, done: int) -> None:
    """Raise InfrastructureError if Redis no longer holds ``job`` (it restarted without persistence)."""
    if not connections.backend(app).exists(keys.job(job.job_id)):
        raise InfrastructureError(
            f"Redis no longer holds job {job.job_id}: it restarted without persistence (or was "
            f"flushed) and the run's state is gone ({_pending(job, done)} before). "
            "The run cannot complete: send it again."
        )


def _require_healable(app: Celery, job: Job, done: int) -> None:
    """Raise InfrastructureError if the healer found a batch of ``job`` lost for good (workers/healing.py)."""
    reason = connections.backend(app).get(keys.unhealable(job.job_id))
    if reason:
        raise InfrastructureError(
            f"job {job.job_id} cannot complete: {reason.decode()} ({_pending(job, done)}). "
            "Send the job again."
        )


def _pending(job: Job, done: int) -> str:
    done = min(done, job.batches)
    items_done = min(job.total, done * job.batch_size)
    return (
        f"{done} of {job.batches} batches done (about {items_done} of {job.total} items), "
        f"{job.batches - done} pending"
    )
