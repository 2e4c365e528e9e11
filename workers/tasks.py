"""The jobs that ship with fanout, as any user would write them, and the one chord callback.

``double`` and ``resize`` are plain functions made fanout tasks by
:func:`workers.core.task`, exactly as a user's function is; the resize report
(``manifest.json`` and the contact sheet) is resize's reduce step.  Nothing
else here knows about either job.

``collect`` is the chord callback of every job: it merges the header parts
back into input order and, when the job names one, runs its reduce.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from workers import connections, keys, results, storage
from workers.app import app
from workers.core import lookup, task
from workers.doubling import double as double_value
from workers.errors import TransientError
from workers.fanin import ItemFailure, Outcome, describe, merge, merge_retry
from workers.paths import inside_url
from workers.report import write_report
from workers.resizing import ResizeOptions, resize_to
from workers.settings import get_settings

logger = logging.getLogger(__name__)

#: Attempts of an item whose I/O failed in a way worth another try (network, storage).
RESIZE_RETRIES = 3

#: Doubling as a fanout task: big batches, since one item takes a microsecond.
double_batch = task(name="fanout.double_batch", batch_size=10_000)(double_value)


@app.task(name="fanout.double")
def double(value: Any) -> int:
    """One integer doubled as a task of its own (for ``celery call`` and Celery's own canvas)."""
    return double_value(value)


def _source(item: list[Any]) -> Any:
    return item[0] if isinstance(item, list) and item else item


@task(
    name="fanout.resize_items",
    batch_size=8,
    retries=RESIZE_RETRIES,
    retry_on=(TransientError,),
    backoff=1.0,
    label=_source,
)
def resize_items(
    item: list[Any], options: dict[str, Any], out_dir: str | None = None, skip_existing: bool = False
) -> dict[str, Any]:
    """Resize one ``[source_url, destination_url, width, height]`` item with ``options`` (ResizeOptions JSON).

    With ``out_dir``, a destination that would land outside it is the item's
    error, whatever the message says.  Outputs are written atomically (rename,
    or one PUT), so running an item twice is harmless.  With ``skip_existing``,
    an output already there that opens as an image is left as it is and
    reported with ``"skipped": true``.
    """
    source, destination, width, height = item
    if out_dir is not None:
        destination = inside_url(str(destination), out_dir, str(source))
    box = (int(width), int(height))
    if skip_existing:
        found = existing_output(str(source), str(destination), box)
        if found is not None:
            return found
    record = resize_to(str(source), str(destination), box, _options(options))
    return dict(record)


def existing_output(source: str, destination: str, box: tuple[int, int]) -> dict[str, Any] | None:
    """The record of an output already at ``destination`` that opens as an image, or None."""
    from PIL import Image

    try:
        data = storage.read_bytes(destination)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # the whole file is there and decodes (a crash mid-write leaves no such file)
            width, height = im.size
            fmt = str(im.format or "").lower()
    except Exception:  # noqa: BLE001 - missing, partial or not an image: make it again
        return None
    return {
        "source": source,
        "destination": destination,
        "box": list(box),
        "width": width,
        "height": height,
        "format": fmt,
        "bytes": len(data),
        "seconds": 0.0,
        "skipped": True,
    }


def _options(options: dict[str, Any]) -> ResizeOptions:
    try:
        return ResizeOptions.from_json(options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad resize options: {exc}") from None


@task(name="fanout.resize_report")
def resize_report(
    results: list[Any],
    errors: list[ItemFailure],
    out_dir: str,
    job_id: str = "",
    per_image: int = 1,
    sheet: bool = True,
) -> dict[str, str | None]:
    """Resize's reduce: write ``manifest.json`` and the contact sheet under ``out_dir``; return their URLs."""
    outcome: Outcome = {
        "job_id": job_id,
        "task": "resize",
        "total": len(results),
        "succeeded": len(results) - len(errors),
        "failed": len(errors),
        "results": results,
        "errors": errors,
    }
    # Written once: a redelivered callback finds the same manifest and leaves it.
    return write_report(out_dir, outcome, per_image, sheet)


@app.task(name="fanout.collect", bind=True)
def collect(self: Task, parts: list[Any], job: dict[str, Any]) -> Outcome:
    """The chord callback: merge the header parts into one outcome in input order, then reduce.

    ``job`` carries ``job_id``, ``task`` and ``total``, and optionally ``reduce``
    (a fanout task's name) with ``reduce_kwargs``, and ``retry_of`` with
    ``indexes`` (this job ran those items of an earlier job again: the two
    outcomes are merged).  A reduce that fails leaves the outcome complete,
    with ``reduce_error`` saying why.
    """
    job_id = str(job["job_id"])
    where = job.get("where")
    if where:  # sent by reference: the parts are files, the joins carry where they are
        outcome = results.merge_refs(parts, int(job["total"]), job_id, str(job["task"]), str(where))
    else:
        outcome = merge(parts, int(job["total"]), job_id, str(job["task"]))
    if job.get("retry_of"):
        previous = self.app.backend.get_task_meta(str(job["retry_of"]))
        if previous.get("status") == "SUCCESS":
            indexes = job["indexes"] if "indexes" in job else results.read_json(str(job["indexes_url"]))
            earlier: Outcome = previous["result"]
            if where and "ref" in earlier:  # both by reference: merged a part at a time
                outcome = results.merge_retry_refs(earlier, outcome, indexes, job_id, str(where))
            else:
                merged = merge_retry(
                    results.materialize(earlier), results.materialize(outcome), list(indexes), job_id
                )
                outcome = results.keep(merged, str(where)) if where else merged
        else:
            outcome["stopped"] = f"the outcome of job {job['retry_of']} is gone (expired?): not merged"
    if self.request.group:
        raw = connections.backend(self.app).get(keys.stop(str(self.request.group)))
        if raw:
            outcome["stopped"] = raw.decode()
    name = job.get("reduce")
    if name:
        # A reduce takes lists: a job sent by reference has them built here, from its parts.
        whole = results.materialize(outcome)
        outcome.update(reduce_outcome(str(name), whole, dict(job.get("reduce_kwargs") or {})))  # type: ignore[typeddict-item]
        del whole
    if where and job.get("root"):
        try:
            results.sweep(str(job["root"]), get_settings().result_expires)
        except Exception:  # an old job left behind is no reason to fail this one
            logger.warning("could not sweep the results location %s", job.get("root"), exc_info=True)
    return outcome


def reduce_outcome(name: str, outcome: Outcome, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"reduced": value}`` from the reduce task ``name``, or ``{"reduce_error": reason}``."""
    definition = lookup(name)
    if definition is None:
        return {"reduce_error": f"no task {name} on this worker (set FANOUT_IMPORTS on the workers)"}
    try:
        return {"reduced": definition.reduce(outcome["results"], outcome["errors"], kwargs)}
    except SoftTimeLimitExceeded:
        return {"reduce_error": f"{name}: the reduce ran past its soft time limit"}
    except Exception as exc:
        logger.warning("reduce %s raised", name, exc_info=True)
        return {"reduce_error": f"{name}: {describe(exc)}"}
