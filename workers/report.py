"""What a resize run leaves next to its outputs: ``manifest.json`` and the contact sheet.

A resize run's work items are (image, size) pairs, image-major: with ``k``
sizes, items ``i*k .. i*k+k-1`` are image ``i``.  The manifest groups them
back by image: every image with its source, its outputs (size, bytes, timing)
and its error.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from PIL import Image

from workers import storage
from workers.contact_sheet import compose, pages, read_tile, thumbnail
from workers.fanin import OutcomeDoc

MANIFEST = "manifest.json"
CONTACT_SHEET = "contact-sheet.png"

log = logging.getLogger(__name__)


def images(outcome: OutcomeDoc, per_image: int = 1, tiles: bool = False) -> list[dict[str, Any]]:
    """The outcome grouped by image, in input order: ``index``, ``source``, ``ok``, ``outputs``, ``error``.

    Outputs are listed without their ``tile`` unless ``tiles``: tiles are scaffolding
    the callback deletes once the sheet is made.
    """
    per_image = max(1, per_image)
    failures = {e["index"]: e for e in outcome["errors"]}
    grouped: list[dict[str, Any]] = []
    for image, first in enumerate(range(0, outcome["total"], per_image)):
        indices = range(first, min(first + per_image, outcome["total"]))
        outputs = [
            {k: v for k, v in outcome["results"][i].items() if tiles or k != "tile"}
            for i in indices
            if i not in failures and outcome["results"][i]
        ]
        errors = [failures[i] for i in indices if i in failures]
        source = outputs[0]["source"] if outputs else next((e["input"] for e in errors if e["input"]), None)
        item: dict[str, Any] = {
            "index": image,
            "source": source,
            "ok": not errors,
            "outputs": outputs,
            "bytes": sum(int(o.get("bytes", 0)) for o in outputs),
            "seconds": round(sum(float(o.get("seconds", 0.0)) for o in outputs), 4),
        }
        if errors:
            item["error"] = "; ".join(dict.fromkeys(e["error"] for e in errors))
        grouped.append(item)
    return grouped


def manifest(
    outcome: OutcomeDoc, per_image: int = 1, items: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The ``manifest.json`` document: totals, then every image in input order."""
    items = images(outcome, per_image) if items is None else items
    return {
        "job_id": outcome["job_id"],
        "images": len(items),
        "outputs": outcome["succeeded"],
        "total": outcome["total"],
        "succeeded": outcome["succeeded"],
        "failed": outcome["failed"],
        "items": items,
    }


#: Threads reading tiles (and, for a missing tile, outputs) back: Pillow decodes
#: without the GIL and object stores answer with latency.
SHEET_THREADS = 4
#: The same from an object store, where each read is mostly waiting on the network.
REMOTE_SHEET_THREADS = 16
#: Pages encoded at once (each about 50 MB in memory while it is).
ENCODERS = 2


def sheet_names(count: int) -> list[str]:
    """The sheet's file names for ``count`` images: one page keeps the plain name."""
    _, ranges = pages(count)
    if len(ranges) == 1:
        return [CONTACT_SHEET]
    stem = CONTACT_SHEET.removesuffix(".png")
    return [f"{stem}-{n}.png" for n in range(1, len(ranges) + 1)]


def _smallest(item: dict[str, Any]) -> dict[str, Any] | None:
    outputs = item["outputs"]
    if not item["ok"] or not outputs:
        return None
    return dict(min(outputs, key=lambda o: int(o["width"]) * int(o["height"])))


def _tile(output: dict[str, Any] | None) -> Image.Image | None:
    """An output's tile; if the header task left none, the output itself read back and reduced."""
    if output is None:
        return None
    tile = read_tile(str(output["tile"])) if output.get("tile") else None
    return tile if tile is not None else thumbnail(str(output["destination"]))


def contact_sheet_pages(
    outputs: list[dict[str, Any] | None], threads: int = SHEET_THREADS
) -> Iterator[Image.Image]:
    """Each page of the sheet for one output per image (``None``: failed), made one at a time."""
    columns, ranges = pages(len(outputs))
    with ThreadPoolExecutor(threads) as pool:
        for indices in ranges:
            tiles = list(pool.map(_tile, [outputs[i] for i in indices]))
            yield compose(tiles, columns=columns, first=indices.start)


def _tiles_of(outcome: OutcomeDoc) -> list[str]:
    return [str(r["tile"]) for r in outcome["results"] if isinstance(r, dict) and r.get("tile")]


def write_report(out_dir: str, outcome: OutcomeDoc, per_image: int = 1, sheet: bool = True) -> dict[str, Any]:
    """Write ``manifest.json`` and (if ``sheet``) the contact sheet's pages under ``out_dir`` (a path or URL).

    The sheet is pasted from the tiles the header tasks left (no output is read
    back unless its tile is missing); the tiles are deleted afterwards.  A sheet
    of more than one page is ``contact-sheet-1.png``, ``contact-sheet-2.png``,
    ...; the manifest names them under ``contact_sheets``.  The manifest is the
    record, written last and always; a sheet that cannot be made is logged and
    left out rather than failing the run.  Written once: a redelivered callback
    finds the same manifest already there and leaves the files alone.

    Returns the URLs: ``manifest``, ``contact_sheet`` (the first page or
    ``None``) and ``contact_sheets`` (every page).  The ``tile`` of each result in
    ``outcome`` is removed, as the tile itself is.
    """
    items = images(outcome, per_image, tiles=True)
    sheet_outputs = [_smallest(item) for item in items]
    for item in items:
        item["outputs"] = [{k: v for k, v in o.items() if k != "tile"} for o in item["outputs"]]
    manifest_url = storage.join(out_dir, MANIFEST)
    names = sheet_names(len(items)) if sheet else []
    document = manifest(outcome, per_image, items)
    document["contact_sheets"] = names
    tiles = _tiles_of(outcome)
    if not _holds(manifest_url, document):
        try:
            _write_pages(out_dir, names, sheet_outputs)
        except Exception:  # the sheet is a convenience; the manifest is the record
            log.exception("could not write the contact sheet under %s", out_dir)
            document["contact_sheets"] = names = []

        def write_manifest(fh: IO[bytes]) -> None:
            fh.write(json.dumps(document, indent=2).encode() + b"\n")

        storage.write_atomic(manifest_url, write_manifest)
    try:
        storage.remove_many(tiles)
    except Exception:  # leftover tiles are untidy, not wrong
        log.warning("could not delete the contact-sheet tiles under %s", out_dir, exc_info=True)
    for result in outcome["results"]:
        if isinstance(result, dict):
            result.pop("tile", None)  # gone from the store, so gone from the results the client gets
    urls = [storage.join(out_dir, name) for name in names]
    return {"manifest": manifest_url, "contact_sheet": urls[0] if urls else None, "contact_sheets": urls}


def _write_pages(out_dir: str, names: list[str], outputs: list[dict[str, Any] | None]) -> None:
    """Write the sheet's pages, encoding them in threads while the next one's tiles are read.

    Pillow's PNG encoder lets go of the GIL for much of its work: two pages of
    960 images took 1.03 s one after the other, 0.66 s in two threads.
    """
    if not names:
        return

    def write(name: str, page: Image.Image) -> None:
        # Fast compression: the callback is on the run's critical path, and PNG's
        # optimize pass took 1.7 s for a 400-image sheet (compress_level=1: 0.2 s).
        storage.write_atomic(
            storage.join(out_dir, name), lambda fh: page.save(fh, format="PNG", compress_level=1)
        )

    with ThreadPoolExecutor(ENCODERS) as encoder:
        pending: deque[Future[None]] = deque()
        threads = SHEET_THREADS if storage.is_local(out_dir) else REMOTE_SHEET_THREADS
        for name, page in zip(names, contact_sheet_pages(outputs, threads), strict=True):
            if len(pending) >= ENCODERS:
                pending.popleft().result()  # at most ENCODERS + 1 pages in memory
            pending.append(encoder.submit(write, name, page))
        for future in pending:
            future.result()


def _holds(url: str, document: dict[str, Any]) -> bool:
    """Whether ``url`` already holds exactly ``document``."""
    try:
        return bool(json.loads(storage.read_bytes(url)) == json.loads(json.dumps(document)))
    except (OSError, ValueError):
        return False
