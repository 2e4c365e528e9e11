"""Worker logs that name the job: every line about a batch says which job, which items, how long.

A header task runs one batch of a job.  From :func:`begin` until the task ends
(Celery's ``task_postrun``), every record its pool process logs - fanout's own
lines, Celery's "succeeded" line, the user's function's own logging - carries
the batch's fields (``record.fanout``): the job id, the task, the batch's
index range ``[start, end)`` and its item count; :func:`finished` adds its
seconds and its done and failed items.  A line logged elsewhere about a batch
(the main process requeueing one at its hard time limit) passes the same
fields as ``extra`` (:func:`extra`), or names the batch for a call into Celery
(:func:`naming`: its "Soft time limit exceeded" line).  Nothing here touches Redis: the job id
comes from the chord callback every header message carries.

How the fields are shown is ``FANOUT_LOG_FORMAT``, applied once to the handlers
Celery sets up (``after_setup_logger`` and ``after_setup_task_logger``, wired in
:mod:`workers.app`):

* ``human`` (the default): Celery's own format, the fields in front of the message,
  ``job=ID task=NAME items=[0, 100) count=100 seconds=0.012 done=98 failed=2: batch finished``;
* ``json``: one JSON object per line, for log shippers: ``ts``, ``level``,
  ``logger``, ``process``, ``message``, the fields as keys (``job_id``, ``task``,
  ``start``, ``end``, ``count``, ``seconds``, ...), and ``traceback`` if any.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery.utils.log import get_multiprocessing_logger

from workers.settings import get_settings

#: The record attribute that holds a line's batch fields.
ATTRIBUTE = "fanout"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One batch of a job, as its log lines name it: items ``start`` .. ``end - 1``."""

    job_id: str | None
    task: str
    start: int
    end: int
    began: float = field(default_factory=time.monotonic, compare=False)

    @property
    def count(self) -> int:
        return self.end - self.start

    def fields(self, **more: Any) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "task": self.task,
            "start": self.start,
            "end": self.end,
            "count": self.count,
            **more,
        }


#: The batch this process is running, if any (a prefork pool process runs one at a time).
_current: contextvars.ContextVar[Batch | None] = contextvars.ContextVar("fanout_batch", default=None)


def job_id(chord: Any) -> str | None:
    """The job id of a header task whose message carries the chord callback ``chord``.

    The callback (``fanout.collect``) is told its job (orchestrator/canvas.py
    ``callback_job``) and runs under the job's id as its task id; every header
    message carries it (Celery's ``chord`` option), so reading it costs nothing.
    """
    if not isinstance(chord, dict):
        return None
    job = (chord.get("kwargs") or {}).get("job")
    if isinstance(job, dict) and job.get("job_id"):
        return str(job["job_id"])
    task_id = (chord.get("options") or {}).get("task_id")
    return str(task_id) if task_id else None


def item_count(items: Any) -> int:
    """How many items a header message's ``items`` holds (a list, a range, or a reference with its count)."""
    if isinstance(items, list):
        return len(items)
    if isinstance(items, dict):
        if "range" in items:
            low, high = items["range"]
            return int(high) - int(low)
        if "count" in items:
            return int(items["count"])
    return 0


def begin(chord: Any, task: str, start: int, items: Any) -> Batch:
    """A header task starts its batch: its lines name it from now until the task ends."""
    batch = Batch(job_id(chord), task, start, start + item_count(items))
    _current.set(batch)
    return batch


def end(**_: Any) -> None:
    """The task ended (``task_postrun``): its process's lines name no batch any more."""
    _current.set(None)


@contextlib.contextmanager
def naming(batch: Batch | None) -> Iterator[None]:
    """Lines logged in the block name ``batch`` (for code of Celery's, which takes no ``extra``)."""
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Batch | None:
    return _current.get()


def finished(batch: Batch, part: Any) -> None:
    """Log the line that says a batch is finished: its fields, its seconds, its done and failed items."""
    failed = len(part.get("errors") or ()) if isinstance(part, dict) else 0
    seconds = round(time.monotonic() - batch.began, 4)
    logger.info(
        "batch finished",
        extra=extra(batch, seconds=seconds, done=batch.count - failed, failed=failed),
    )


def extra(batch: Batch | None, **more: Any) -> dict[str, Any]:
    """``extra=`` for a line about ``batch`` logged outside its run (or with more fields)."""
    return {ATTRIBUTE: batch.fields(**more)} if batch is not None else {}


def about_item(index: int | None) -> dict[str, Any]:
    """``extra=`` for a line about item ``index`` of the batch running."""
    return extra(_current.get(), index=index) if index is not None else {}


def of_request(request: Any) -> Batch | None:
    """The batch a header task's request (in the worker's main process) runs, if it is one."""
    args: Sequence[Any] = getattr(request, "args", None) or ()
    if len(args) < 2 or not isinstance(args[0], int):
        return None
    return Batch(
        job_id(getattr(request, "chord", None)),
        str(request.task_name),
        args[0],
        args[0] + item_count(args[1]),
    )


# -- formatting ---------------------------------------------------------------------------------

#: The order fields are shown in, in the human format (any others follow).
_ORDER = ("job_id", "task", "start", "end", "count", "seconds", "done", "failed", "index")


def render(fields: dict[str, Any]) -> str:
    """``job=ID task=NAME items=[0, 100) count=100 ...``: a line's fields, as the human format shows them."""
    shown = [f"job={fields.get('job_id') or '-'}", f"task={fields.get('task')}"]
    shown.append(f"items=[{fields.get('start')}, {fields.get('end')})")
    shown.extend(
        f"{key}={fields[key]}" for key in ("count", "seconds", "done", "failed", "index") if key in fields
    )
    shown.extend(f"{key}={value}" for key, value in fields.items() if key not in _ORDER)
    return " ".join(shown)


class BatchFields(logging.Filter):
    """Gives a record logged during a batch that batch's fields (a handler filter: it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, ATTRIBUTE):
            batch = _current.get()
            if batch is not None:
                setattr(record, ATTRIBUTE, batch.fields())
        return True


class HumanFormatter(logging.Formatter):
    """Celery's formatter, with a record's batch fields in front of its message."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, ATTRIBUTE, None)
        if not fields:
            return self.inner.format(record)
        msg, args = record.msg, record.args
        try:
            record.msg, record.args = f"{render(fields)}: {record.getMessage()}", None
        except (TypeError, ValueError):  # a bad format string: the inner formatter reports it
            return self.inner.format(record)
        try:
            return self.inner.format(record)
        finally:
            record.msg, record.args = msg, args


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: for log shippers (``FANOUT_LOG_FORMAT=json``)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for key in ("task_id", "task_name"):  # Celery's task logger adds these
            if key in record.__dict__:
                doc[key] = record.__dict__[key]
        doc.update(getattr(record, ATTRIBUTE, None) or {})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["traceback"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str)


def apply(target: logging.Logger | None, log_format: str) -> None:
    """Give ``target``'s handlers the batch fields and the ``log_format`` (once each)."""
    if target is None:
        return
    for handler in target.handlers:
        if not any(isinstance(f, BatchFields) for f in handler.filters):
            handler.addFilter(BatchFields())
        formatter = handler.formatter
        if isinstance(formatter, (HumanFormatter, JsonFormatter)):
            continue
        handler.setFormatter(
            JsonFormatter() if log_format == "json" else HumanFormatter(formatter or logging.Formatter())
        )


def configure(logger: logging.Logger | None = None, **_: Any) -> None:
    """``after_setup_logger`` / ``after_setup_task_logger``: apply FANOUT_LOG_FORMAT to what Celery set up."""
    log_format = get_settings().log_format
    apply(logger, log_format)
    if logger is logging.getLogger():
        apply(get_multiprocessing_logger(), log_format)
