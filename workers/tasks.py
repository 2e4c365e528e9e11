"""Celery tasks: thin adapters from JSON messages to the plain functions.

Header tasks (``double_batch``, ``resize_batch``) never raise for a bad item:
they return a :class:`~workers.fanin.Part` with the item's error, because one
raising header task would make Celery fail the whole chord with ``ChordError``.
Their results travel to the callback through the chord's own join, so they
store no result of their own (``ignore_result``) and the client that sends
them subscribes to none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from workers.app import app
from workers.doubling import double as double_value
from workers.fanin import Outcome, Part, fail_batch, manifest, merge, run_batch, write_json_atomic
from workers.imaging import resize_image

#: Retries of a batch whose items hit transient I/O errors, with backoff.
MAX_RETRIES = 3


@app.task(name="fanout.double")
def double(value: Any) -> int:
    """Double one integer (for ``celery call`` and direct use)."""
    return double_value(value)


@app.task(name="fanout.double_batch", ignore_result=True)
def double_batch(start: int, values: list[Any]) -> Part:
    """Double ``values``, the input items ``start`` onwards."""
    try:
        return run_batch(double_value, start, values)
    except SoftTimeLimitExceeded:
        return fail_batch(start, values, "time limit exceeded")


@app.task(name="fanout.resize_batch", bind=True, ignore_result=True, max_retries=MAX_RETRIES)
def resize_batch(self: Task, start: int, items: list[list[str]], max_side: int) -> Part:
    """Resize ``items`` (pairs of source and destination paths) to fit ``max_side``."""

    def work(pair: list[str]) -> Any:
        source, destination = pair
        return resize_image(source, destination, int(max_side))

    def label(pair: list[str]) -> str:
        return pair[0]

    try:
        part = run_batch(work, start, items, label)
    except SoftTimeLimitExceeded:
        return fail_batch(start, items, "time limit exceeded", label)
    if part["transient"] and self.request.retries < MAX_RETRIES:
        # Outputs are written atomically, so redoing the whole batch is safe.
        raise self.retry(countdown=2**self.request.retries)
    return part


@app.task(name="fanout.collect")
def collect(parts: list[Part | None], job: dict[str, Any]) -> Outcome:
    """The chord callback: merge the header parts into one outcome in input order.

    ``job`` carries ``job_id``, ``task`` and ``total``; for resize also
    ``out_dir``, where ``manifest.json`` is written.
    """
    outcome = merge(parts, int(job["total"]), str(job["job_id"]), str(job["task"]))
    out_dir = job.get("out_dir")
    if out_dir:
        write_json_atomic(Path(out_dir) / "manifest.json", manifest(outcome))
    return outcome
