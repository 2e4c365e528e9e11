"""What a resize run leaves next to its outputs: ``manifest.json`` and ``contact-sheet.png``.

A resize run's work items are (image, size) pairs, image-major: with ``k``
sizes, items ``i*k .. i*k+k-1`` are image ``i``.  The manifest groups them
back by image: every image with its source, its outputs (size, bytes, timing)
and its error.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from PIL import Image

from workers import storage
from workers.contact_sheet import compose, thumbnail
from workers.fanin import Outcome

MANIFEST = "manifest.json"
CONTACT_SHEET = "contact-sheet.png"

log = logging.getLogger(__name__)


def images(outcome: Outcome, per_image: int = 1) -> list[dict[str, Any]]:
    """The outcome grouped by image, in input order: ``index``, ``source``, ``ok``, ``outputs``, ``error``."""
    per_image = max(1, per_image)
    failures = {e["index"]: e for e in outcome["errors"]}
    grouped: list[dict[str, Any]] = []
    for image, first in enumerate(range(0, outcome["total"], per_image)):
        indices = range(first, min(first + per_image, outcome["total"]))
        outputs = [outcome["results"][i] for i in indices if i not in failures and outcome["results"][i]]
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


def manifest(outcome: Outcome, per_image: int = 1) -> dict[str, Any]:
    """The ``manifest.json`` document: totals, then every image in input order."""
    items = images(outcome, per_image)
    return {
        "job_id": outcome["job_id"],
        "images": len(items),
        "outputs": outcome["succeeded"],
        "total": outcome["total"],
        "succeeded": outcome["succeeded"],
        "failed": outcome["failed"],
        "items": items,
    }


#: Threads reading thumbnails back: Pillow decodes without the GIL, and the
#: callback runs on the run's critical path while the other pool processes idle.
SHEET_THREADS = 4


def contact_sheet(items: list[dict[str, Any]]) -> Image.Image:
    """The sheet for manifest ``items``: each image's smallest output, failures marked."""

    def smallest(item: dict[str, Any]) -> str | None:
        outputs = item["outputs"]
        if not item["ok"] or not outputs:
            return None
        return str(min(outputs, key=lambda o: int(o["width"]) * int(o["height"]))["destination"])

    def tile(url: str | None) -> Image.Image | None:
        return thumbnail(url) if url else None

    with ThreadPoolExecutor(SHEET_THREADS) as pool:
        tiles = list(pool.map(tile, [smallest(item) for item in items]))
    return compose(tiles)


def write_report(
    out_dir: str, outcome: Outcome, per_image: int = 1, sheet: bool = True
) -> dict[str, str | None]:
    """Write ``manifest.json`` and (if ``sheet``) ``contact-sheet.png`` under ``out_dir`` (a path or URL).

    The manifest is the record and is always written; a sheet that cannot be
    made is logged and left out rather than failing the run.  Written once: a
    redelivered callback finds the same manifest already there and leaves both
    files alone.
    """
    document = manifest(outcome, per_image)
    manifest_url = storage.join(out_dir, MANIFEST)
    sheet_url: str | None = storage.join(out_dir, CONTACT_SHEET)
    if _holds(manifest_url, document):
        return {
            "manifest": manifest_url,
            "contact_sheet": sheet_url if storage.exists(str(sheet_url)) else None,
        }

    def write_manifest(fh: IO[bytes]) -> None:
        fh.write(json.dumps(document, indent=2).encode() + b"\n")

    storage.write_atomic(manifest_url, write_manifest)
    if not sheet:
        return {"manifest": manifest_url, "contact_sheet": None}
    try:
        picture = contact_sheet(document["items"])
        # Fast compression: the callback is on the run's critical path, and PNG's
        # optimize pass took 1.7 s for a 400-image sheet (compress_level=1: 0.2 s).
        storage.write_atomic(str(sheet_url), lambda fh: picture.save(fh, format="PNG", compress_level=1))
    except Exception:  # the sheet is a convenience; the manifest is the record
        log.exception("could not write the contact sheet under %s", out_dir)
        sheet_url = None
    return {"manifest": manifest_url, "contact_sheet": sheet_url}


def _holds(url: str, document: dict[str, Any]) -> bool:
    """Whether ``url`` already holds exactly ``document``."""
    try:
        return bool(json.loads(storage.read_bytes(url)) == json.loads(json.dumps(document)))
    except (OSError, ValueError):
        return False
