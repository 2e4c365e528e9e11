"""Celery tasks: thin adapters from JSON messages to the plain functions.

Header tasks (``double_batch``, ``resize_batch``) never raise for a bad item:
they return a :class:`~workers.fanin.Part` with the item's error, because one
raising header task would make Celery fail the whole chord with ``ChordError``.
Their results travel to the callback through the chord's own join, so they
store no result of their own (``ignore_result``) and the client that sends
them subscribes to none.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from workers.app import app
from workers.doubling import double as double_value
from workers.fanin import Outcome, Part, fail_batch, merge, run_batch
from workers.imaging import resize_image
from workers.report import write_report
from workers.resizing import ResizeOptions, resize_to

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
    ``out_dir`` (a path or URL), where ``manifest.json`` and ``contact-sheet.png``
    are written, and ``per_image``, the number of sizes made of each image.
    """
    outcome = merge(parts, int(job["total"]), str(job["job_id"]), str(job["task"]))
    out_dir = job.get("out_dir")
    if out_dir:
        write_report(str(out_dir), outcome, int(job.get("per_image", 1)))
    return outcome


@app.task(name="fanout.resize_items", bind=True, ignore_result=True, max_retries=MAX_RETRIES)
def resize_items(self: Task, start: int, items: list[list[Any]], options: dict[str, Any]) -> Part:
    """Resize ``items``, each ``[source_url, destination_url, width, height]``, with ``options``.

    One item is one (image, size) pair; ``options`` is a :class:`ResizeOptions` as JSON.
    """

    def label(item: list[Any]) -> str:
        return str(item[0])

    try:
        spec = ResizeOptions.from_json(options)
    except (TypeError, ValueError) as exc:
        return fail_batch(start, items, f"bad resize options: {exc}", label)

    def work(item: list[Any]) -> Any:
        source, destination, width, height = item
        return resize_to(str(source), str(destination), (int(width), int(height)), spec)

    try:
        part = run_batch(work, start, items, label)
    except SoftTimeLimitExceeded:
        return fail_batch(start, items, "time limit exceeded", label)
    if part["transient"] and self.request.retries < MAX_RETRIES:
        # Outputs are written atomically (rename, or one PUT), so redoing the batch is safe.
        raise self.retry(countdown=2**self.request.retries)
    return part
