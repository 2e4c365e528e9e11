"""Building the chord: pure, testable without a broker.

A job is a Celery ``chord``: a ``group`` of header tasks, each running one
batch of consecutive items through a fanout task, and ``fanout.collect`` as
the callback that merges their parts back into input order (and runs the
job's reduce, if it has one).  One builder serves every task; ``double`` and
``resize`` are thin shorthands over it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import chord, group
from celery.canvas import Signature

from workers import results, storage
from workers.app import app
from workers.batches import batch_task_id, header_args, items_ref, plain_range
from workers.resizing import ResizeOptions
from workers.settings import get_settings

#: Largest batch for doubling: big enough to hide per-task overhead.
MAX_DOUBLE_BATCH = 10_000
#: Largest batch of images: small enough to spread work evenly and stay far below time limits.
MAX_RESIZE_BATCH = 8
#: Batches per worker process that ``auto`` aims for, so no process idles at the end.
BATCHES_PER_PROCESS = 4
#: The chord callback of every job.
COLLECT = "fanout.collect"
#: How the worker that completes a chord retries publishing its callback: about 40 s,
#: longer than a Sentinel failover (the callback carries the parts; it must not be lost).
CALLBACK_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 2}
DOUBLE = "fanout.double_batch"
RESIZE = "fanout.resize_items"
RESIZE_REPORT = "fanout.resize_report"
#: Where a resize job sent by reference keeps its results, under its --out (unless FANOUT_RESULTS_URL).
RESIZE_RESULTS = ".fanout-results"


@dataclass(frozen=True)
class Plan:
    """A job built and not yet sent: its chord and what is needed to follow it."""

    job_id: str
    task: str  # what the job is called in its outcome and in `fanout status`
    total: int
    batch_size: int
    signature: Signature
    #: How the CLI prints the outcome: "double", "resize" or "jsonl" (kept in the job's record).
    output: str = "jsonl"
    #: Names of the fanout tasks a worker must have to run this job.
    requires: tuple[str, ...] = field(default=())
    #: The input items, kept with the job so that its failed items can be sent again.
    items: Sequence[Any] = field(default=(), repr=False)
    #: How to build the job again (task, kwargs, reduce...): kept in its record for `fanout retry`.
    spec: dict[str, Any] = field(default_factory=dict)
    #: The job's directory in the results location when it is sent by reference, else None.
    where: str | None = None
    #: Files to write there before anything is sent (URL, JSON value).
    files: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    @property
    def batches(self) -> int:
        return math.ceil(self.total / self.batch_size) if self.total else 0

    def record(self, group_id: str) -> dict[str, Any]:
        """What ``fanout status`` needs to find this job again, once sent as group ``group_id``."""
        return {
            "job_id": self.job_id,
            "group_id": group_id,
            "task": self.task,
            "total": self.total,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "output": self.output,
            "spec": self.spec,
        }


def auto_batch_size(total: int, processes: int, cap: int) -> int:
    """A batch size giving each worker process about BATCHES_PER_PROCESS batches, at most ``cap``."""
    if total <= 0:
        return 1
    return max(1, min(cap, math.ceil(total / (max(1, processes) * BATCHES_PER_PROCESS))))


def new_job_id() -> str:
    return str(uuid.uuid4())


def build(
    task: str,
    items: Sequence[Any],
    batch_size: int,
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: str | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
    reduce_limits: tuple[int, int] | None = None,
    job_id: str | None = None,
    shown_as: str | None = None,
    output: str = "jsonl",
    retry_of: str | None = None,
    indexes: Sequence[int] | None = None,
    by_reference: bool | None = None,
    results_root: str | None = None,
) -> Plan:
    """The chord running fanout task ``task`` over ``items``, ``batch_size`` at a time.

    ``kwargs`` go to every call of the task (JSON, the same for the whole job);
    ``reduce`` names a fanout task the callback runs on the merged outcome, with
    ``reduce_kwargs`` and, if given, ``reduce_limits`` (hard, soft seconds).
    ``retry_of`` names a finished job whose items at ``indexes`` these ``items``
    are again: the callback merges the two outcomes in the original order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    job_id = job_id or new_job_id()
    shown_as = shown_as or task
    settings = get_settings()
    if by_reference is None:
        by_reference = len(items) >= settings.by_reference_items
    root = storage.normalize(results_root or settings.results_root) if by_reference else None
    where = results.job_dir(root, job_id) if root else None
    files: list[tuple[str, Any]] = []
    tail: tuple[Any, ...] = ((kwargs,) if kwargs else ()) if where is None else (kwargs, where)
    header = [
        app.signature(task, args=header_args(start, _batch(items, start, batch_size, where), tail)).set(
            # The same id every time this batch is sent: a batch sent again is counted once.
            immutable=True,
            ignore_result=True,
            task_id=batch_task_id(job_id, index),
        )
        for index, start in enumerate(range(0, len(items), batch_size))
    ]
    job: dict[str, Any] = {"job_id": job_id, "task": shown_as, "total": len(items)}
    if where is not None:
        job["where"] = where
        job["root"] = root
    if reduce:
        job["reduce"] = reduce
        job["reduce_kwargs"] = reduce_kwargs or {}
    if retry_of:
        job["retry_of"] = retry_of
        if where is None:
            job["indexes"] = list(indexes or ())
        else:  # not in every header message: they carry the callback
            job["indexes_url"] = storage.join(where, "indexes.json")
            files.append((job["indexes_url"], list(indexes or ())))
    # The worker whose report completes the chord publishes this callback; its publish is
    # retried through a Redis failover (a few seconds) instead of the client's quick policy,
    # or the chord fails with "No master found" (Celery fails it when the publish raises).
    body = app.signature(COLLECT, kwargs={"job": job}).set(
        task_id=job_id, retry=True, retry_policy=CALLBACK_RETRY_POLICY
    )
    if reduce_limits:
        body = body.set(time_limit=reduce_limits[0], soft_time_limit=reduce_limits[1])
    # Not frozen here: freezing a group registers its results with the backend
    # (a Redis subscription), and building must not touch the network.
    signature = chord(group(header), body)
    requires = (task, reduce) if reduce else (task,)
    spec = {
        "task": task,
        "kwargs": kwargs,
        "reduce": reduce,
        "reduce_kwargs": reduce_kwargs,
        "reduce_limits": list(reduce_limits) if reduce_limits else None,
        "shown_as": shown_as,
        "output": output,
    }
    if where is not None:
        spec["where"] = where
        spec["root"] = root
        if plain_range(items):
            spec["range"] = [items.start, items.stop]  # type: ignore[attr-defined]
    return Plan(
        job_id,
        shown_as,
        len(items),
        batch_size,
        signature,
        output,
        requires,
        items,
        spec,
        where,
        tuple(files),
    )


def _batch(items: Sequence[Any], start: int, batch_size: int, where: str | None) -> Any:
    """A batch's items as its header message carries them: listed, or by reference."""
    if where is None:
        return list(items[start : start + batch_size])
    return items_ref(items, start, batch_size, where)


def build_double(values: Sequence[int], batch_size: int, job_id: str | None = None) -> Plan:
    """Doubling ``values``: a list, or a range (sent by reference as bounds, never listed)."""
    items = values if isinstance(values, range) else list(values)
    return build(DOUBLE, items, batch_size, job_id=job_id, shown_as="double", output="double")


def build_resize(
    pairs: Sequence[tuple[str, str]], max_side: int, out_dir: str, batch_size: int, job_id: str | None = None
) -> Plan:
    """The plain resize job: each (source, destination) fitted within ``max_side`` pixels."""
    if max_side < 1:
        raise ValueError("max_side must be at least 1")
    items = [(src, dst, max_side, max_side) for src, dst in pairs]
    return build_resize_items(items, ResizeOptions().to_json(), out_dir, 1, batch_size, job_id)


def build_resize_items(
    items: Sequence[tuple[str, str, int, int]],
    options: dict[str, Any],
    out_dir: str,
    per_image: int,
    batch_size: int,
    job_id: str | None = None,
    sheet: bool = True,
    skip_existing: bool = False,
) -> Plan:
    """A resize job of (source URL, destination URL, width, height) items, image-major.

    ``per_image`` is how many sizes each image has (consecutive items), so the
    report can group the outputs by image; ``sheet`` asks it for a contact sheet;
    with ``skip_existing`` an output already there (and readable) is not made again.
    """
    if per_image < 1 or len(items) % per_image:
        raise ValueError("per_image must divide the items into whole images")
    job_id = job_id or new_job_id()
    rows = [[src, dst, int(w), int(h)] for src, dst, w, h in items]
    return build(
        RESIZE,
        rows,
        batch_size,
        kwargs={"options": options, "out_dir": out_dir, **({"skip_existing": True} if skip_existing else {})},
        reduce=RESIZE_REPORT,
        reduce_kwargs={"out_dir": out_dir, "job_id": job_id, "per_image": per_image, "sheet": sheet},
        job_id=job_id,
        shown_as="resize",
        output="resize",
        # Next to the outputs, which every worker already writes, unless FANOUT_RESULTS_URL says where.
        results_root=get_settings().results_url or storage.join(out_dir, RESIZE_RESULTS),
    )
