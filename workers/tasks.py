"""Celery tasks: thin adapters from JSON messages to the plain functions.

Header tasks (``double_batch``, ``resize_items``) never raise for a bad item:
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
from workers.attempts import RedisAttemptLog, run_counted
from workers.doubling import double as double_value
from workers.fanin import Outcome, Part, fail_batch, merge
from workers.paths import inside_url
from workers.report import write_report
from workers.resizing import ResizeOptions, resize_to
from workers.settings import get_settings

#: Retries of a batch whose items hit transient I/O errors, with backoff.
MAX_RETRIES = 3
#: Header tasks' request class: a hard time limit requeues the batch instead of failing the chord.
HEADER_REQUEST = "workers.attempts:HeaderRequest"


def attempt_log(task: Task) -> RedisAttemptLog:
    """Where ``task``'s runs are counted, so a poison item is failed rather than retried forever."""
    return RedisAttemptLog(task.app.backend.client, str(task.request.id), get_settings().result_expires)


@app.task(name="fanout.double")
def double(value: Any) -> int:
    """Double one integer (for ``celery call`` and direct use)."""
    return double_value(value)


@app.task(name="fanout.double_batch", bind=True, ignore_result=True, Request=HEADER_REQUEST)
def double_batch(self: Task, start: int, values: list[Any]) -> Part:
    """Double ``values``, the input items ``start`` onwards."""
    try:
        return run_counted(double_value, start, values, attempt_log(self))
    except SoftTimeLimitExceeded:
        return fail_batch(start, values, "time limit exceeded")


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
        # Written once: a redelivered callback finds the same manifest and leaves it.
        write_report(str(out_dir), outcome, int(job.get("per_image", 1)), bool(job.get("sheet", True)))
    return outcome


@app.task(
    name="fanout.resize_items", bind=True, ignore_result=True, max_retries=MAX_RETRIES, Request=HEADER_REQUEST
)
def resize_items(
    self: Task, start: int, items: list[list[Any]], options: dict[str, Any], out_dir: str | None = None
) -> Part:
    """Resize ``items``, each ``[source_url, destination_url, width, height]``, with ``options``.

    One item is one (image, size) pair; ``options`` is a :class:`ResizeOptions` as JSON.
    With ``out_dir``, a destination that would land outside it is that item's error,
    whatever the message says.
    """

    def label(item: list[Any]) -> str:
        return str(item[0])

    try:
        spec = ResizeOptions.from_json(options)
    except (TypeError, ValueError) as exc:
        return fail_batch(start, items, f"bad resize options: {exc}", label)

    def work(item: list[Any]) -> Any:
        source, destination, width, height = item
        if out_dir is not None:
            destination = inside_url(str(destination), out_dir, str(source))
        return resize_to(str(source), str(destination), (int(width), int(height)), spec)

    try:
        part = run_counted(work, start, items, attempt_log(self), label)
    except SoftTimeLimitExceeded:
        return fail_batch(start, items, "time limit exceeded", label)
    if part["transient"] and self.request.retries < MAX_RETRIES:
        # Outputs are written atomically (rename, or one PUT), so redoing the batch is safe.
        raise self.retry(countdown=2**self.request.retries)
    return part
