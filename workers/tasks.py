"""The jobs that ship with fanout, as any user would write them.

``double`` and ``resize`` are plain functions made fanout tasks by
:func:`workers.core.task`, exactly as a user's function is; the resize report
(``manifest.json`` and the contact sheet) is resize's reduce step.  Nothing
else here knows about either job.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from celery import Task

from workers import connections, sheets, storage
from workers.app import app
from workers.contact_sheet import make_tile, thumbnail
from workers.core import FanoutTask, task
from workers.doubling import double as double_value
from workers.errors import TransientError
from workers.fanin import ItemFailure, OutcomeDoc, Part
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


def resize_item(
    item: list[Any],
    options: dict[str, Any],
    out_dir: str | None = None,
    skip_existing: bool = False,
    sheet: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Resize one ``[source_url, destination_url, width, height]`` item with ``options`` (ResizeOptions JSON).

    With ``out_dir``, a destination that would land outside it is the item's
    error, whatever the message says.  Outputs are written atomically (rename,
    or one PUT), so running an item twice is harmless.  With ``skip_existing``,
    an output already there that opens as an image is left as it is and
    reported with ``"skipped": true``.  An item with a fifth element, the index
    of its image, is that image's sheet item: its tile is kept for the batch's
    strip (workers/sheets.py).
    """
    source, destination, width, height, *cell = item
    if out_dir is not None:
        destination = inside_url(str(destination), out_dir, str(source))
    box = (int(width), int(height))
    made = sheets.batch_tiles.get()
    keep = None
    if cell and sheet and made is not None:  # the image's sheet item: keep its tile for the batch's strip

        def keep(out: Any, image: int = int(cell[0])) -> None:
            made[image] = make_tile(out)

    if skip_existing:
        found = existing_output(str(source), str(destination), box)
        if found is not None:
            small = thumbnail(str(destination)) if keep is not None else None
            if small is not None and made is not None:
                made[int(cell[0])] = small
            return found
    record = resize_to(str(source), str(destination), box, _options(options), keep)
    return dict(record)


class ResizeTask(FanoutTask[..., dict[str, Any]]):
    """The resize header: after each batch, count its sheet items and draw the pages it completes."""

    def run_batch(self, task: Task, start: int, items: list[Any], kwargs: dict[str, Any]) -> Part:
        sheet, group = kwargs.get("sheet"), task.request.group
        if not (sheet and group and kwargs.get("out_dir")):
            return super().run_batch(task, start, items, kwargs)
        made: dict[int, Any] = {}
        token = sheets.batch_tiles.set(made)
        try:
            part = super().run_batch(task, start, items, kwargs)
        finally:
            sheets.batch_tiles.reset(token)
        try:
            client = connections.backend(task.app)
            expires = get_settings().result_expires
            sheets.batch_done(client, str(group), start, items, made, sheet, str(kwargs["out_dir"]), expires)
        except Exception:  # the fan-in draws any page not drawn here
            logger.warning("could not draw a contact-sheet page after batch %s", start, exc_info=True)
        return part


resize_items = ResizeTask(
    resize_item,
    "fanout.resize_items",
    batch_size=32,  # as orchestrator.builtin.MAX_RESIZE_BATCH
    time_limit=None,
    retries=RESIZE_RETRIES,
    retry_on=(TransientError,),
    backoff=1.0,
    label=_source,
)


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
    tiles: str | None = None,
) -> dict[str, str | None]:
    """Resize's reduce: write ``manifest.json`` and the contact sheet under ``out_dir``; return their URLs."""
    outcome: OutcomeDoc = {
        "job_id": job_id,
        "task": "resize",
        "total": len(results),
        "succeeded": len(results) - len(errors),
        "failed": len(errors),
        "results": results,
        "errors": errors,
    }
    # Written once: a redelivered callback finds the same manifest and leaves it.
    return write_report(out_dir, outcome, per_image, sheet, tiles)
