"""Sending a job: the one path every job takes, from Python, the CLI, ``retry`` and ``demo``.

::

    fanout.map ─▶ submit ─▶ prepare ─▶ send ─▶ publish ─▶ publish_chord
                  (checks    (plan.py:  (Redis, the      (the chord, the
                  the task)  pure)      workers, the     inputs, the record)
                                        batch size)

:func:`send` checks that Redis answers and that some worker has the job's
tasks, chooses the batch size from the workers' processes, and :func:`publish`
builds the chord (orchestrator/canvas.py), puts the job's inputs and failure
budget in Redis, publishes the chord in bulk (orchestrator/publish.py) and
writes the job's record.  Both return the :class:`~orchestrator.jobs.Job`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import redis
from celery import Celery
from celery.canvas import Signature
from kombu.utils.url import maybe_sanitize_url

from orchestrator import canvas, follow
from orchestrator.discovery import require_workers
from orchestrator.jobs import DEFAULT_TIMEOUT, Job, Outcome
from orchestrator.plan import (
    BatchSize,
    JobSpec,
    Plan,
    auto_batch_size,
    batch_size_of,
    failure_budget,
    prepare,
)
from orchestrator.publish import cancel_sent, frozen_callback, header_of, publish_chord, task_limits
from orchestrator.room import require_room
from workers import connections, keys, results
from workers.batches import batch_task_id, pack
from workers.core import FanoutTask
from workers.errors import ConfigError, InfrastructureError, InputError, UnknownJob
from workers.settings import Settings, get_settings


def _app() -> Celery:
    from workers.app import app

    return app


def submit(
    task: FanoutTask[Any, Any],
    items: Iterable[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: FanoutTask[Any, Any] | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
    batch_size: BatchSize = "auto",
    max_failures: int | str | None = None,
) -> Job:
    """Send ``task`` over ``items`` (JSON values) and return at once with the :class:`Job`.

    ``kwargs`` go to every call, ``task(item, **kwargs)``.  With ``reduce``, a
    worker runs ``reduce(results, errors, **reduce_kwargs)`` on the merged
    outcome as the chord callback; its value is ``outcome.reduced``.
    ``batch_size`` is items per task: "auto" spreads the items over the
    workers' processes, at most the task's own ``batch_size``.  ``items`` may
    be an iterator (a generator): past FANOUT_BY_REFERENCE_ITEMS of them the
    job is streamed, never held in memory, its batches sized by how long items
    take, and this returns once its last batch is sent (orchestrator/stream.py).  ``max_failures``
    (N, or "P%") cancels the job once more items than that have failed.
    """
    spec = spec_of(task, kwargs=kwargs, reduce=reduce, reduce_kwargs=reduce_kwargs)
    return send(prepare(spec, items), batch_size=batch_size, max_failures=max_failures)


def map(
    task: FanoutTask[Any, Any],
    items: Iterable[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: FanoutTask[Any, Any] | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
    batch_size: BatchSize = "auto",
    max_failures: int | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Outcome:
    """Run ``task`` over ``items`` on the workers and return the :class:`Outcome`, in input order.

    Blocks for at most ``timeout`` seconds (``RunTimeout`` after that: the job
    goes on, and ``Job.attach(id)`` finds it again).  A KeyboardInterrupt while
    it waits cancels the job, then goes on up.  See :func:`submit`.
    Inside a task it raises WaitInsideTask before anything is sent: use
    :func:`submit` there, and return the job's id.
    """
    follow.refuse_inside_task("fanout.map")
    job = submit(
        task,
        items,
        kwargs=kwargs,
        reduce=reduce,
        reduce_kwargs=reduce_kwargs,
        batch_size=batch_size,
        max_failures=max_failures,
    )
    try:
        return job.wait(timeout)
    except KeyboardInterrupt:
        job.cancel()
        raise


def spec_of(
    task: FanoutTask[Any, Any],
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: FanoutTask[Any, Any] | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
) -> JobSpec:
    """The spec of a job of ``task`` (InputError unless it, and ``reduce``, are fanout tasks)."""
    definition = _task_of(task, "task")
    reducer = _task_of(reduce, "reduce") if reduce is not None else None
    limits = None
    if reducer is not None and reducer.time_limit and reducer.soft_time_limit:
        limits = (reducer.time_limit, reducer.soft_time_limit)
    if definition.fold is not None and reducer is not None:
        raise InputError(f"{definition.name} folds its results (fold=): it takes no reduce")
    return JobSpec(
        definition.name,
        kwargs=kwargs,
        reduce=reducer.name if reducer else None,
        reduce_kwargs=reduce_kwargs,
        reduce_limits=limits,
        batch_cap=definition.batch_size,
        fold=definition.name if definition.fold is not None else None,
    )


def _task_of(value: Any, role: str) -> FanoutTask[Any, Any]:
    if not isinstance(value, FanoutTask):
        raise InputError(
            f"{role} must be a fanout task (decorate the function with @fanout.task), "
            f"got {type(value).__name__}"
        )
    return value


def retry(job_id: str, batch_size: BatchSize = "auto", app: Celery | None = None) -> Job:
    """:meth:`Job.retry_failed` for job ``job_id``: its failed and cancelled items, as a new job."""
    app = app or _app()
    job = Job.attach(job_id, app)
    outcome = job.status().outcome
    if outcome is None:
        raise InputError(f"job {job_id} has not finished: wait for it, or cancel it, before retrying")
    if job.spec.fold:  # its value would need the old one merged in (not done yet): send the job again
        raise InputError(f"job {job_id} folds its results: it cannot be retried; send it again")
    indexes = [int(e["index"]) for e in results.outcome_errors(outcome)]
    if not indexes:
        raise InputError(f"job {job_id} has no failed items to retry")
    # A retry's items are its original job's: read from there.
    original = job if job.spec.inputs_of is None else _attach_inputs(job.spec.inputs_of, app)
    plan = prepare(
        # Its results go where the job's went.
        replace(job.spec, results_root=job.spec.root or job.spec.results_root),
        original.items_at(indexes),
        retry_of=job_id,
        indexes=indexes,
        # A merged outcome the size of the old one: by reference if the old one was.
        by_reference=True if "ref" in outcome else None,
    )
    return send(plan, batch_size=batch_size, app=app)


def _attach_inputs(job_id: str, app: Celery) -> Job:
    try:
        return Job.attach(job_id, app)
    except UnknownJob:
        raise InputError(
            f"the inputs of job {job_id} are no longer kept (FANOUT_RESULT_EXPIRES seconds): "
            "send the job again"
        ) from None


def send(
    plan: Plan,
    *,
    batch_size: BatchSize = "auto",
    max_failures: int | str | None = None,
    app: Celery | None = None,
) -> Job:
    """Check Redis and that some worker has the job's tasks, choose the batch size, publish ``plan``.

    ``batch_size`` "auto" gives each worker process about four batches, at
    most the spec's ``batch_cap``; a streamed plan's (orchestrator/stream.py)
    are sized by how long its items take, and it returns once its last batch is
    sent.  ``max_failures`` (a count, or "P%") stops the job once more items
    than that have failed.
    """
    app = app or _app()
    settings = get_settings()
    size = batch_size_of(batch_size)
    budget = failure_budget(max_failures, plan.total)  # a streamed plan's is checked here, counted later
    check_redis(settings)
    able = require_workers(app, plan.spec.requires, settings.queue)
    processes = sum(w.concurrency for w in able) or 1
    check_limits(app, plan.spec, settings)
    if plan.streamed:  # read, checked and spooled now, its batches sized as they go
        from orchestrator import stream

        return stream.publish(app, plan, size, max_failures, processes)
    return publish(app, plan, size or auto_batch_size(plan.total, processes, plan.spec.batch_cap), budget)


def publish(
    app: Celery,
    plan: Plan,
    batch_size: int,
    max_failures: int | None = None,
    *,
    signature: Signature | None = None,
) -> Job:
    """Publish ``plan`` as a chord of ``batch_size`` batches, and record it; no checks first.

    The header goes out in bulk (orchestrator/publish.py: the same messages as
    ``apply_async``, pipelined); the client keeps no subscription to any
    header result.  The job's inputs are kept beside its record (compressed
    JSON, or files in the results location by reference) for ``fanout retry``
    and the healer; a failure budget is in place before any header task can run.
    ``signature`` is a chord built by hand to send instead of the plan's own
    (routed to a queue of its own, say); the healer sends its batches again
    only if its header ids are the plan's (workers/batches.py).
    """
    expires = get_settings().result_expires
    spec = plan.spec
    if spec.where is not None:  # before anything is sent: a location no one can write is a usage error
        results.check_writable(str(spec.root))
    require_room(app, plan, plan.batches(batch_size))  # a job that would not fit in Redis is refused
    signature = signature or canvas.build(plan, batch_size)
    before = _Before(app, plan, batch_size, expires, max_failures)
    try:
        group_id = publish_chord(app, signature, before=before)
    except BaseException as exc:
        cancel_sent(app, before.group_id, expires, plan.job_id, exc)
        raise
    job = Job(
        plan.job_id,
        group_id,
        spec,
        plan.total,
        batch_size,
        plan.batches(batch_size),
        sent_at=time.time(),
        heal=heal_recipe(app, plan.job_id, signature, group_id),
        app=app,
    )
    job.save(expires)
    return job


def heal_recipe(app: Celery, job_id: str, signature: Any, group_id: str) -> dict[str, Any] | None:
    """How a worker sends a batch of the job again if Redis drops it (kept in the job's record).

    None when the job's header tasks do not have the ids derived from the job's
    (a chord built by hand): a batch sent again would then be counted twice.
    """
    header, callback = header_of(signature)
    # The first and the last say how the ids were made (each a hash: not checked one by one).
    ends = {0, len(header) - 1} if header else set()
    if not header or any(header[i].options.get("task_id") != batch_task_id(job_id, i) for i in ends):
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


class _Before:
    """What must be in Redis (or the results location) before the job's first header message is:
    its inputs, a retry's indexes, and its failure budget."""

    def __init__(
        self, app: Celery, plan: Plan, batch_size: int, expires: int, max_failures: int | None
    ) -> None:
        self.app, self.plan, self.batch_size = app, plan, batch_size
        self.expires, self.max_failures = expires, max_failures
        self.group_id: str | None = None

    def __call__(self, group_id: str) -> None:
        self.group_id = group_id
        plan, spec, size = self.plan, self.plan.spec, self.batch_size
        if spec.where is not None:
            # By reference: the inputs go to the results location (the header messages
            # name them; `fanout retry` reads them there), never to Redis.
            if spec.retry_of:
                results.write_json(canvas.indexes_url(spec.where), list(plan.indexes or ()))
            if spec.range is None:
                for start in range(0, plan.total, size):
                    results.write_json(
                        results.input_url(spec.where, start), list(plan.items[start : start + size])
                    )
        with connections.backend(self.app).pipeline(transaction=False) as pipe:
            if spec.where is None:
                pipe.set(keys.inputs(plan.job_id), pack(plan.items), ex=self.expires)
            if self.max_failures is not None:
                pipe.set(keys.budget(group_id), f"{self.max_failures}/{plan.total}", ex=self.expires)
            pipe.execute()


def _redact(url: str) -> str:
    """``url`` without its password: every Sentinel of a sentinel:// URL carries one (kombu's
    ``maybe_sanitize_url`` would hide only the first)."""
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


def check_limits(app: Celery, spec: JobSpec, settings: Settings) -> None:
    """ConfigError if a task's own time limit would let Redis hand a running batch to a second worker."""
    for name in spec.requires:
        limit = getattr(app.tasks.get(name), "time_limit", None)
        if limit and limit >= settings.visibility_timeout:
            raise ConfigError(
                f"task {name} has time_limit={limit} s, which must be below "
                f"FANOUT_VISIBILITY_TIMEOUT={settings.visibility_timeout} s, or a running batch "
                "would be handed to a second worker; raise FANOUT_VISIBILITY_TIMEOUT on every machine"
            )
