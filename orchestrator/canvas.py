"""Building a job's chord: pure, testable without a broker.

A job is a Celery ``chord``: a ``group`` of header tasks, each running one
batch of consecutive items through the job's fanout task, and
``fanout.collect`` as the callback that merges their parts back into input
order (and runs the job's reduce, if it has one).  One builder serves every
job, the built-in ones (orchestrator/builtin.py) as any other.
"""

from __future__ import annotations

from typing import Any

from celery import chord, group
from celery.canvas import Signature

from orchestrator.plan import Plan
from workers import storage
from workers.app import app
from workers.batches import batch_task_id, header_args, items_ref
from workers.errors import InputError

#: The chord callback of every job (workers/callback.py).
COLLECT = "fanout.collect"
#: How the worker that completes a chord retries publishing its callback: about 40 s,
#: longer than a Sentinel failover (the callback carries the parts; it must not be lost).
CALLBACK_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 2}


def build(plan: Plan, batch_size: int) -> Signature:
    """The chord running ``plan``'s task over its items, ``batch_size`` at a time.

    Each header task gets the batch's first index, its items (listed, or by
    reference), then the job's kwargs (and its results location, by reference).
    The callback is told the job's id, name and size, its reduce, and for a
    retry which items of which job these are.
    """
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    spec, items = plan.spec, plan.items
    tail: tuple[Any, ...] = (
        ((spec.kwargs,) if spec.kwargs else ()) if spec.where is None else (spec.kwargs, spec.where)
    )
    header = [
        app.signature(spec.task, args=header_args(start, _batch(plan, start, batch_size), tail)).set(
            # The same id every time this batch is sent: a batch sent again is counted once.
            immutable=True,
            ignore_result=True,
            task_id=batch_task_id(plan.job_id, index),
        )
        for index, start in enumerate(range(0, len(items), batch_size))
    ]
    # Not frozen here: freezing a group registers its results with the backend
    # (a Redis subscription), and building must not touch the network.
    return chord(group(header), callback(plan))


def callback(plan: Plan) -> Signature:
    """The chord callback of ``plan``'s job: ``fanout.collect``, under the job's id."""
    spec = plan.spec
    # The worker whose report completes the chord publishes this callback; its publish is
    # retried through a Redis failover (a few seconds) instead of the client's quick policy,
    # or the chord fails with "No master found" (Celery fails it when the publish raises).
    body = app.signature(COLLECT, kwargs={"job": callback_job(plan)}).set(
        task_id=plan.job_id, retry=True, retry_policy=CALLBACK_RETRY_POLICY
    )
    if spec.reduce_limits:
        body = body.set(time_limit=spec.reduce_limits[0], soft_time_limit=spec.reduce_limits[1])
    return body


def callback_job(plan: Plan) -> dict[str, Any]:
    """What the chord callback is told about the job (workers/callback.py: ``collect``)."""
    spec = plan.spec
    job: dict[str, Any] = {"job_id": plan.job_id, "task": spec.shown_as, "total": plan.total}
    if spec.where is not None:
        job["where"] = spec.where
        job["root"] = spec.root
    if spec.fold:
        job["fold"] = spec.fold
    if spec.reduce:
        job["reduce"] = spec.reduce
        job["reduce_kwargs"] = spec.reduce_kwargs or {}
    if spec.retry_of:
        job["retry_of"] = spec.retry_of
        if spec.where is None:
            job["indexes"] = list(plan.indexes or ())
        else:  # not in every header message (they carry the callback): a file beside the inputs
            job["indexes_url"] = indexes_url(spec.where)
    return job


def indexes_url(where: str) -> str:
    """Where a retry sent by reference keeps the indexes of its items in the job it retries."""
    return storage.join(where, "indexes.json")


def _batch(plan: Plan, start: int, batch_size: int) -> Any:
    """A batch's items as its header message carries them: listed, or by reference."""
    if plan.spec.where is None:
        return list(plan.items[start : start + batch_size])
    return items_ref(plan.items, start, batch_size, plan.spec.where)
