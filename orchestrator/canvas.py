"""Building the chord: pure, testable without a broker.

A job is a Celery ``chord``: a ``group`` of header tasks, each doing one batch
of consecutive items, and ``fanout.collect`` as the callback that merges their
parts back into input order.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import chord, group
from celery.canvas import Signature

from workers.resizing import ResizeOptions
from workers.tasks import collect, double_batch, resize_items

#: Largest batch for doubling: big enough to hide per-task overhead.
MAX_DOUBLE_BATCH = 10_000
#: Largest batch of images: small enough to spread work evenly and stay far below time limits.
MAX_RESIZE_BATCH = 8
#: Batches per worker process that ``auto`` aims for, so no process idles at the end.
BATCHES_PER_PROCESS = 4


@dataclass(frozen=True)
class Job:
    job_id: str
    task: str
    total: int
    batch_size: int
    signature: Signature

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
        }


def auto_batch_size(total: int, processes: int, cap: int) -> int:
    """A batch size giving each worker process about BATCHES_PER_PROCESS batches, at most ``cap``."""
    if total <= 0:
        return 1
    return max(1, min(cap, math.ceil(total / (max(1, processes) * BATCHES_PER_PROCESS))))


def new_job_id() -> str:
    return str(uuid.uuid4())


def _chord(
    task: str, total: int, batch_size: int, header: list[Signature], job_id: str, extra: dict[str, Any]
) -> Job:
    job = {"job_id": job_id, "task": task, "total": total, **extra}
    body = collect.s(job=job).set(task_id=job_id)
    # Not frozen here: freezing a group registers its results with the backend
    # (a Redis subscription), and building must not touch the network.
    signature = chord(group(header), body)
    return Job(job_id, task, total, batch_size, signature)


def build_double(values: Sequence[int], batch_size: int, job_id: str | None = None) -> Job:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    values = list(values)
    header = [
        double_batch.si(start, values[start : start + batch_size]).set(ignore_result=True)
        for start in range(0, len(values), batch_size)
    ]
    return _chord("double", len(values), batch_size, header, job_id or new_job_id(), {})


def build_resize(
    pairs: Sequence[tuple[str, str]], max_side: int, out_dir: str, batch_size: int, job_id: str | None = None
) -> Job:
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
) -> Job:
    """A resize job of (source URL, destination URL, width, height) items, image-major.

    ``per_image`` is how many sizes each image has (consecutive items), so the
    callback can group the outputs by image; ``sheet`` asks it for a contact sheet.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if per_image < 1 or len(items) % per_image:
        raise ValueError("per_image must divide the items into whole images")
    rows = [[src, dst, int(w), int(h)] for src, dst, w, h in items]
    header = [
        resize_items.si(start, rows[start : start + batch_size], options, out_dir).set(ignore_result=True)
        for start in range(0, len(rows), batch_size)
    ]
    extra = {"out_dir": out_dir, "per_image": per_image, "sheet": sheet}
    return _chord("resize", len(rows), batch_size, header, job_id or new_job_id(), extra)
