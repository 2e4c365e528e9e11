"""The jobs that ship with fanout, planned on the same public core as any user's.

``double`` and ``resize`` are specs over fanout tasks (workers/tasks.py) and
a :func:`~orchestrator.plan.prepare`; nothing in the core knows about them.
Planning a resize loads :class:`~workers.resizing.ResizeOptions` (Pillow);
``import fanout`` does not import this module.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from orchestrator.plan import JobSpec, Plan, prepare
from workers import storage
from workers.errors import InputError
from workers.resizing import ResizeOptions
from workers.settings import get_settings
from workers.sheets import tiles_dir

#: Largest batch for doubling: big enough to hide per-task overhead, and the round trips of
#: workers on other machines (a batch costs about 4.5 round trips: at 2 ms, 1,000,000 items
#: in batches of 10,000 took 0.72x their time at 0 ms, in batches of 125,000 0.96x and less
#: time at 0 ms too; python -m bench.latency).  A batch of 125,000 doublings takes about 0.1 s.
MAX_DOUBLE_BATCH = 125_000
#: Largest batch of images.  A batch costs the worker some CPU whatever it holds (receiving
#: it, three task events, reporting it: about 2.5 ms for one item, python -m bench.pertask), so
#: 2,000 1080p photos in batches of 32 took 15% less CPU in all than in batches of 8, and
#: 2,000 noisy ones 4% less than in batches of 10 (docs/performance.md)...
MAX_RESIZE_BATCH = 32
#: ...with no more source bytes than this on average, so that a batch of big images (decoding
#: and resampling cost up to about 50 ms a MB here) stays well inside the 20 s soft time limit:
#: 32 photos of 1.25 MB or less, 3 scans of 12 MB, 1 of 40 MB or more.
RESIZE_BATCH_BYTES = 40_000_000
DOUBLE = "fanout.double_batch"
RESIZE = "fanout.resize_items"
RESIZE_REPORT = "fanout.resize_report"
#: Where a resize job sent by reference keeps its results, under its --out (unless FANOUT_RESULTS_URL).
RESIZE_RESULTS = ".fanout-results"


def double(values: Sequence[int], job_id: str | None = None) -> Plan:
    """Doubling ``values``: a list, or a range (sent by reference as bounds, never listed)."""
    spec = JobSpec(DOUBLE, shown_as="double", output="double", batch_cap=MAX_DOUBLE_BATCH)
    return prepare(spec, values, job_id=job_id)


def resize(pairs: Sequence[tuple[str, str]], max_side: int, out_dir: str, job_id: str | None = None) -> Plan:
    """The plain resize job: each (source, destination) fitted within ``max_side`` pixels."""
    if max_side < 1:
        raise InputError("max_side must be at least 1")
    items = [(src, dst, max_side, max_side) for src, dst in pairs]
    return resize_items(items, ResizeOptions().to_json(), out_dir, 1, job_id)


def resize_items(
    items: Sequence[tuple[str, str, int, int]],
    options: dict[str, Any],
    out_dir: str,
    per_image: int,
    job_id: str | None = None,
    sheet: bool = True,
    skip_existing: bool = False,
    source_bytes: int | None = None,
) -> Plan:
    """A resize job of (source URL, destination URL, width, height) items, image-major.

    ``per_image`` is how many sizes each image has (consecutive items), so the
    report can group the outputs by image; ``sheet`` asks for a contact sheet,
    drawn page by page as the job runs (workers/sheets.py): each image's
    smallest box is its sheet item, which carries the image's index as a fifth
    element; with ``skip_existing`` an output already there (and readable) is
    not made again.  ``source_bytes``, the mean size of a source when known,
    lowers the largest batch to about :data:`RESIZE_BATCH_BYTES` of sources.
    """
    if per_image < 1 or len(items) % per_image:
        raise InputError("per_image must divide the items into whole images")
    job_id = job_id or str(uuid.uuid4())  # the report names the job: chosen here
    listed: list[list[Any]] = [[src, dst, int(w), int(h)] for src, dst, w, h in items]
    kwargs: dict[str, Any] = {"options": options, "out_dir": out_dir}
    if skip_existing:
        kwargs["skip_existing"] = True
    tiles = None
    if sheet:
        tiles = tiles_dir(out_dir, job_id)
        kwargs["sheet"] = {"images": len(items) // per_image, "tiles": tiles}
        for image, first in enumerate(range(0, len(listed), per_image)):
            group = listed[first : first + per_image]
            min(group, key=lambda item: item[2] * item[3]).append(image)
    spec = JobSpec(
        RESIZE,
        shown_as="resize",
        output="resize",
        kwargs=kwargs,
        reduce=RESIZE_REPORT,
        reduce_kwargs={
            "out_dir": out_dir,
            "job_id": job_id,
            "per_image": per_image,
            "sheet": sheet,
            "tiles": tiles,
        },
        batch_cap=resize_batch_cap(source_bytes),
        # Next to the outputs, which every worker already writes, unless FANOUT_RESULTS_URL says where.
        results_root=get_settings().results_url or storage.join(out_dir, RESIZE_RESULTS),
    )
    return prepare(spec, listed, job_id=job_id)


def resize_batch_cap(source_bytes: int | None) -> int:
    """The largest batch of resize items whose sources are ``source_bytes`` on average (None: unknown)."""
    if not source_bytes:
        return MAX_RESIZE_BATCH
    return max(1, min(MAX_RESIZE_BATCH, RESIZE_BATCH_BYTES // source_bytes))
