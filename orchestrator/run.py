"""Sending a job and following it to its fan-in, always with a bound.

Following a job is one loop, :func:`follow`: every poll is O(1) Redis commands
(the callback's state and the count of finished batches), it ends early when
nothing moves and no worker is left, and it rides out a Redis restart.  Both
:func:`wait` (the whole outcome) and :func:`parts_as_completed` (results as
batches finish) are built on it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, Protocol

import redis
from celery import Celery
from celery.states import READY_STATES
from kombu.exceptions import OperationalError

from orchestrator.canvas import Plan
from orchestrator.discovery import WorkerInfo, list_workers, require_workers
from orchestrator.room import require_room, stall_cause
from workers import connections, keys, results
from workers.backend import replicated
from workers.batches import batch_task_id, pack
from workers.errors import ConfigError, InfrastructureError, RunTimeout
from workers.fanin import CANCELLED, Outcome, Part, flatten
from workers.settings import Settings

__all__ = [
    "WorkerInfo",
    "batches_done",
    "callback_meta",
    "check_redis",
    "follow",
    "list_workers",
    "load_record",
    "require_workers",
    "send_job",
    "submit",
    "wait",
]

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


def _redact(url: str) -> str:
    """``url`` without its password: every Sentinel of a sentinel:// URL carries one (kombu's
    ``maybe_sanitize_url`` would hide only the first)."""
    from kombu.utils.url import maybe_sanitize_url

    return ";".join(str(maybe_sanitize_url(chunk)) for chunk in url.split(";"))


def check_redis(settings: Settings) -> None:
    """Raise InfrastructureError, within a few seconds, if Redis does not answer."""
    roles: dict[str, str] = {}
    for name, url in (("broker", settings.broker_url), ("result backend", settings.result_backend)):
        roles[url] = f"{roles[url]} and {name}" if url in roles else name
    # One connection and PING per distinct Redis: broker and backend are usually the same one.
    for url, name in roles.items():
        client = connections.client(url, settings)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise InfrastructureError(
                f"cannot reach Redis ({name}) at {_redact(url)}: {connections.describe(exc)}. "
                + connections.remedy(exc)
            ) from None
        finally:
            connections.close(client)


def submit(app: Celery, job: Plan, expires: int, max_failures: int | None = None) -> str:
    """Publish the job's chord and record it; return the header's group id.

    The header goes out in bulk (see orchestrator/publish.py: the same messages
    as ``apply_async``, pipelined); the client keeps no subscription to any
    header result.  The job's inputs are kept beside its record (compressed
    JSON) for ``fanout retry``; a failure budget is in place before any header
    task can run.
    """
    from orchestrator.publish import publish_chord

    if job.where is not None:  # before anything is sent: a location no one can write is a usage error
        root = job.spec.get("root") or job.where.rsplit("/", 1)[0]
        results.check_writable(str(root))
    require_room(app, job)  # a job that would not fit in Redis's maxmemory is refused
    prepare = _Prepare(app, job, expires, max_failures)
    try:
        group_id = publish_chord(app, job.signature, before=prepare)
    except BaseException as exc:
        # Interrupted (Ctrl-C) or failed half-way: what was sent must not run for nobody.
        if prepare.group_id is not None:
            with contextlib.suppress(redis.RedisError):  # a Redis refusing writes refuses this too
                connections.backend(app).set(keys.stop(prepare.group_id), CANCELLED, ex=expires)
        if isinstance(exc, redis.RedisError | OSError | OperationalError):
            raise InfrastructureError(
                f"sending job {job.job_id} failed part-way: {exc}. The batches already sent are "
                "cancelled (nothing waits for them). Check Redis (is it out of memory? see its "
                "maxmemory), then send the job again."
            ) from None
        raise
    sent_at = time.time()
    record = {**job.record(group_id), "sent_at": sent_at}
    recipe = heal_recipe(app, job, group_id)
    if recipe is not None:
        record["heal"] = recipe
    with connections.backend(app).pipeline(transaction=False) as pipe:
        pipe.set(keys.job(job.job_id), json.dumps(record), ex=expires)
        # Watched by the workers' healer until its fan-in is done (workers/healing.py).
        pipe.zadd(keys.ACTIVE, {job.job_id: sent_at})
        pipe.execute()
    replicated(connections.backend(app), f"job {job.job_id}'s record and inputs")  # FANOUT_WAIT_REPLICAS
    return group_id


def heal_recipe(app: Celery, job: Plan, group_id: str) -> dict[str, Any] | None:
    """How a worker sends a batch of ``job`` again if Redis drops it (kept in the job's record).

    None when the job's header tasks do not have the ids derived from the job's
    (a chord built by hand): a batch sent again would then be counted twice.
    """
    from orchestrator.publish import frozen_callback, header_of, task_limits

    header, callback = header_of(job.signature)
    # The first and the last say how the ids were made (each a hash: not checked one by one).
    ends = {0, len(header) - 1} if header else set()
    if not header or any(header[i].options.get("task_id") != batch_task_id(job.job_id, i) for i in ends):
        return None
    first = header[0]
    queue = first.options.get("queue") or app.amqp.router.route({}, first.task, (), {})["queue"].name
    hard, soft = task_limits(app, first.task)
    return {
        "task": first.task,
        "queue": str(queue),
        "tail": list(first.args[2:]),
        "callback": frozen_callback(callback, group_id),
        "limits": [first.options.get("time_limit", hard), first.options.get("soft_time_limit", soft)],
    }


class _Prepare:
    """What must be in Redis before the job's first header message is: its inputs and budget."""

    def __init__(self, app: Celery, job: Plan, expires: int, max_failures: int | None) -> None:
        self.app, self.job, self.expires, self.max_failures = app, job, expires, max_failures
        self.group_id: str | None = None

    def __call__(self, group_id: str) -> None:
        self.group_id = group_id
        client = connections.backend(self.app)
        job = self.job
        if job.where is not None:
            # By reference: the inputs go to the results location (the header messages
            # name them; `fanout retry` reads them there), never to Redis.
            for url, value in job.files:
                results.write_json(url, value)
            if job.items and "range" not in job.spec:
                for start in range(0, len(job.items), job.batch_size):
                    results.write_json(
                        results.input_url(job.where, start), list(job.items[start : start + job.batch_size])
                    )
        with client.pipeline(transaction=False) as pipe:
            if job.items and job.where is None:
                pipe.set(keys.inputs(self.job.job_id), pack(self.job.items), ex=self.expires)
            if self.max_failures is not None:
                pipe.set(keys.budget(group_id), f"{self.max_failures}/{self.job.total}", ex=self.expires)
            pipe.execute()


Progress = Callable[[int, int], None]  # (batches done, batches in all)


def batches_done(app: Celery, group_id: str) -> int:
    """How many header tasks have reported: one ZCARD, whatever the job's size."""
    return int(connections.backend(app).zcard(join_key(app, group_id)))


def join_key(app: Celery, group_id: str) -> bytes:
    """Where the chord collects its header parts: a sorted set scored by batch number."""
    key: bytes = app.backend.get_key_for_group(group_id, ".j")
    return key


class Tracked(Protocol):
    """What following needs to know about a job: a :class:`~orchestrator.canvas.Plan`, or a stored record."""

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
    raw = connections.backend(app).get(app.backend.get_key_for_task(job_id))
    if not raw:
        return None
    meta: dict[str, Any] = app.backend.decode_result(raw)
    return meta


def follow(app: Celery, job: Tracked, group_id: str, timeout: float) -> Generator[int, None, Outcome]:
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
                # An outage is not the run standing still: the workers get their time to
                # come back and re-register before the stall check looks for them.
                last_change = now
            lost_since = None
            meta = callback_meta(app, job.job_id)
            if meta is not None and meta.get("status") in READY_STATES:
                return _final(job, meta)
            done = batches_done(app, group_id)
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


def _final(job: Tracked, meta: dict[str, Any]) -> Outcome:
    state = meta["status"]
    if state != "SUCCESS":
        raise InfrastructureError(f"job {job.job_id} ended in {state}: {meta.get('result')!r}")
    outcome: Outcome = meta["result"]
    return outcome


def wait(
    app: Celery, job: Tracked, group_id: str, timeout: float, progress: Progress | None = None
) -> Outcome:
    """Wait for ``job``'s fan-in for at most ``timeout`` seconds; see :func:`follow`.

    ``progress`` sees the count of finished batches only grow: the chord deletes
    its join once every batch is in and the callback is sent, so a count that
    drops means every batch is done and the fan-in has begun.
    """
    polls = follow(app, job, group_id, timeout)
    last = -1
    try:
        while True:
            polled = next(polls)
            done = job.batches if polled < last else polled
            if progress and done != last:
                progress(min(done, job.batches), job.batches)
            last = done
    except StopIteration as stop:
        outcome: Outcome = stop.value
    if progress:
        progress(job.batches, job.batches)
    return outcome


#: Past this many gaps between the batches already read, one read of the whole join is cheaper.
MAX_RANGES = 32


def parts_as_completed(app: Celery, job: Tracked, group_id: str, timeout: float) -> Iterator[Part | Outcome]:
    """Yield each header part as it lands in the chord's join, then the final outcome.

    Each batch is read once: when the count of finished batches changes, only
    the batch numbers not read yet are fetched (one ZRANGEBYSCORE per gap,
    pipelined).  The chord deletes its join once the callback is sent, so the
    final outcome comes last; it holds every item, including those of parts
    never seen here.
    """
    seen: set[int] = set()
    key = join_key(app, group_id)
    polls = follow(app, job, group_id, timeout)
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


def _require_state(app: Celery, job: Tracked, done: int) -> None:
    """Raise InfrastructureError if Redis no longer holds ``job`` (it restarted without persistence)."""
    if load_record(app, job.job_id) is None:
        raise InfrastructureError(
            f"Redis no longer holds job {job.job_id}: it restarted without persistence (or was "
            f"flushed) and the run's state is gone ({_pending(job, done)} before). "
            "The run cannot complete: send it again."
        )


def _require_healable(app: Celery, job: Tracked, done: int) -> None:
    """Raise InfrastructureError if the healer found a batch of ``job`` lost for good (workers/healing.py)."""
    reason = connections.backend(app).get(keys.unhealable(job.job_id))
    if reason:
        raise InfrastructureError(
            f"job {job.job_id} cannot complete: {reason.decode()} ({_pending(job, done)}). "
            "Send the job again."
        )


def _pending(job: Tracked, done: int) -> str:
    done = min(done, job.batches)
    items_done = min(job.total, done * job.batch_size)
    return (
        f"{done} of {job.batches} batches done (about {items_done} of {job.total} items), "
        f"{job.batches - done} pending"
    )


def load_record(app: Celery, job_id: str) -> dict[str, Any] | None:
    raw = connections.backend(app).get(keys.job(job_id))
    return json.loads(raw) if raw else None


def check_limits(app: Celery, plan: Plan, settings: Settings) -> None:
    """ConfigError if a task's own time limit would let Redis hand a running batch to a second worker."""
    for name in plan.requires:
        limit = getattr(app.tasks.get(name), "time_limit", None)
        if limit and limit >= settings.visibility_timeout:
            raise ConfigError(
                f"task {name} has time_limit={limit} s, which must be below "
                f"FANOUT_VISIBILITY_TIMEOUT={settings.visibility_timeout} s, or a running batch "
                "would be handed to a second worker; raise FANOUT_VISIBILITY_TIMEOUT on every machine"
            )


def send_job(
    app: Celery,
    job_factory: Callable[[int], Plan],
    total: int,
    batch_cap: int,
    batch_size: int | None,
    requires: Iterable[str] = (),
    max_failures: int | None = None,
) -> tuple[Plan, str, float]:
    """Check Redis and that some worker has the tasks in ``requires``, build the job and send it.

    Returns the job, its header's group id, and ``time.perf_counter()`` just before sending.
    """
    from orchestrator.canvas import auto_batch_size
    from workers.settings import get_settings

    settings = get_settings()
    check_redis(settings)
    able = require_workers(app, requires, settings.queue)
    processes = sum(w.concurrency for w in able) or 1
    job = job_factory(batch_size or auto_batch_size(total, processes, batch_cap))
    check_limits(app, job, settings)
    started = time.perf_counter()
    return job, submit(app, job, settings.result_expires, max_failures), started
