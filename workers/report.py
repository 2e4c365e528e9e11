"""What a resize run leaves next to its outputs: ``manifest.json`` and the contact sheet.

A resize run's work items are (image, size) pairs, image-major: with ``k``
sizes, items ``i*k .. i*k+k-1`` are image ``i``.  The manifest groups them
back by image: every image with its source, its outputs (size, bytes, timing)
and its error.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from PIL import Image

from workers import storage
from workers.contact_sheet import CONTACT_SHEET, compose, page_names, pages, thumbnail
from workers.fanin import OutcomeDoc
from workers.sheets import Strips, read_note, save_page

MANIFEST = "manifest.json"
__all__ = ["CONTACT_SHEET", "MANIFEST", "images", "manifest", "write_report"]

log = logging.getLogger(__name__)


def images(outcome: OutcomeDoc, per_image: int = 1) -> list[dict[str, Any]]:
    """The outcome grouped by image, in input order: ``index``, ``source``, ``ok``, ``outputs``, ``error``."""
    per_image = max(1, per_image)
    failures = {e["index"]: e for e in outcome["errors"]}
    grouped: list[dict[str, Any]] = []
    for image, first in enumerate(range(0, outcome["total"], per_image)):
        indices = range(first, min(first + per_image, outcome["total"]))
        outputs = [
            dict(outcome["results"][i]) for i in indices if i not in failures and outcome["results"][i]
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


def _smallest(item: dict[str, Any]) -> dict[str, Any] | None:
    outputs = item["outputs"]
    if not item["ok"] or not outputs:
        return None
    return dict(min(outputs, key=lambda o: int(o["width"]) * int(o["height"])))


def _read_back(output: dict[str, Any] | None) -> Image.Image | None:
    return None if output is None else thumbnail(str(output["destination"]))


def contact_sheet_pages(
    outputs: list[dict[str, Any] | None],
    threads: int = SHEET_THREADS,
    only: set[int] | None = None,
    tiles: str | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Each page of the sheet (or those in ``only``) for one output per image (``None``: failed), in turn.

    Each image that succeeded shows its tile from the strips in ``tiles``, or
    else its output read back and reduced.
    """
    columns, ranges = pages(len(outputs))
    strips = Strips(tiles) if tiles is not None else None
    with ThreadPoolExecutor(threads) as pool:
        for page, indices in enumerate(ranges):
            if only is not None and page not in only:
                continue
            made = strips.tiles(indices) if strips is not None else [None] * len(indices)
            drawn = [tile if outputs[i] is not None else None for i, tile in zip(indices, made, strict=True)]
            lacking = [i for i, t in zip(indices, drawn, strict=True) if t is None and outputs[i] is not None]
            for i, tile in zip(lacking, pool.map(_read_back, [outputs[i] for i in lacking]), strict=True):
                drawn[i - indices.start] = tile
            yield page, compose(drawn, columns=columns, first=indices.start)


def drawn_early(tiles: str | None, names: list[str], outputs: list[dict[str, Any] | None]) -> set[int]:
    """The pages a header task already drew (workers/sheets.py) exactly as the outcome would draw them.

    A page drew each missing tile as a failed cell; it is kept if those are the
    failed images of its range, and drawn again otherwise (a tile that could not
    be written, a page drawn before a retry changed it).
    """
    if tiles is None:
        return set()
    _, ranges = pages(len(outputs))
    kept: set[int] = set()
    for page, (name, indices) in enumerate(zip(names, ranges, strict=True)):
        note = read_note(tiles, page)
        failed = [i for i in indices if outputs[i] is None]
        if note is not None and note.get("name") == name and note.get("missing") == failed:
            kept.add(page)
    return kept


def write_report(
    out_dir: str, outcome: OutcomeDoc, per_image: int = 1, sheet: bool = True, tiles: str | None = None
) -> dict[str, Any]:
    """Write ``manifest.json`` and (if ``sheet``) the contact sheet's pages under ``out_dir`` (a path or URL).

    The pages the header tasks drew as the job ran (their notes in ``tiles``,
    see :func:`drawn_early`) are kept; the others are pasted from the strips of
    tiles the header tasks left there (no output is read back unless its tile
    is missing); ``tiles`` is deleted afterwards.  A sheet of more than one
    page is ``contact-sheet-1.jpg``, ``contact-sheet-2.jpg``,
    ...; the manifest names them under ``contact_sheets``.  The manifest is the
    record, written last and always; a sheet that cannot be made is logged and
    left out rather than failing the run.  Written once: a redelivered callback
    finds the same manifest already there and leaves the files alone.

    Returns the URLs: ``manifest``, ``contact_sheet`` (the first page or
    ``None``) and ``contact_sheets`` (every page).
    """
    items = images(outcome, per_image)
    sheet_outputs = [_smallest(item) for item in items]
    manifest_url = storage.join(out_dir, MANIFEST)
    names = page_names(len(items)) if sheet else []
    document = manifest(outcome, per_image, items)
    document["contact_sheets"] = names
    if not _holds(manifest_url, document):
        try:
            early = drawn_early(tiles, names, sheet_outputs) if names else set()
            if names:
                log.info("kept %d of %d contact-sheet pages drawn as the job ran", len(early), len(names))
            _write_pages(out_dir, names, sheet_outputs, set(range(len(names))) - early, tiles)
        except Exception:  # the sheet is a convenience; the manifest is the record
            log.exception("could not write the contact sheet under %s", out_dir)
            document["contact_sheets"] = names = []

        def write_manifest(fh: IO[bytes]) -> None:
            fh.write(json.dumps(document, indent=2).encode() + b"\n")

        storage.write_atomic(manifest_url, write_manifest)
    if tiles is not None:
        _remove(tiles)
    urls = [storage.join(out_dir, name) for name in names]
    return {"manifest": manifest_url, "contact_sheet": urls[0] if urls else None, "contact_sheets": urls}


def _write_pages(
    out_dir: str,
    names: list[str],
    outputs: list[dict[str, Any] | None],
    only: set[int] | None = None,
    tiles: str | None = None,
) -> None:
    """Write the sheet's pages (those in ``only``), encoding one while the next one's tiles are read."""
    if not names or only == set():
        return
    with ThreadPoolExecutor(ENCODERS) as encoder:
        pending: deque[Future[None]] = deque()
        threads = SHEET_THREADS if storage.is_local(out_dir) else REMOTE_SHEET_THREADS
        for number, page in contact_sheet_pages(outputs, threads, only, tiles):
            if len(pending) >= ENCODERS:
                pending.popleft().result()  # at most ENCODERS + 1 pages in memory
            pending.append(encoder.submit(save_page, page, storage.join(out_dir, names[number])))
        for future in pending:
            future.result()


def _remove(tiles: str) -> None:
    """Delete a job's strips and page notes, and (on a file system) its emptied directories."""
    try:
        if storage.exists(tiles):
            storage.remove_many(storage.list_files(tiles))
        if storage.is_local(tiles):
            for directory in (Path(tiles), Path(tiles).parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if empty: another job's tiles stay
    except Exception:  # leftover tiles are untidy, not wrong
        log.warning("could not delete the contact-sheet tiles in %s", tiles, exc_info=True)


def _holds(url: str, document: dict[str, Any]) -> bool:
    """Whether ``url`` already holds exactly ``document``."""
    try:
        return bool(json.loads(storage.read_bytes(url)) == json.loads(json.dumps(document)))
    except (OSError, ValueError):
        return False
