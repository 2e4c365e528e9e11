"""The contact sheet drawn while the job runs: each page as soon as its tiles exist.

A resize job with a sheet gives each image one *sheet item* (its smallest
box), which carries the image's index.  Then:

* each header task keeps its sheet items' tiles (made from the output already
  in memory) and, after the batch, writes them as one *strip*: one small JPEG
  of CELL x CELL cells for the whole batch, in the job's tiles directory,
  named by its first image, its count and which of its cells hold a tile
  (:func:`write_strip`).  One file a batch, not one an image: creating a file
  costs about 0.4 ms of CPU here, as much as encoding a tile;
* it counts the batch's sheet items per page in Redis, in one round trip
  (:func:`count_batch`): a set of the batches already counted makes a batch
  that runs twice (redelivered, or sent again by the healer) count once;
* the batch that brings a page's count to its number of images draws the page
  from the strips (:func:`draw_page`: an image no strip holds is drawn as a
  failed cell), writes it under its final name, then a note of the cells it
  drew as failed;
* at the fan-in, :func:`workers.report.write_report` keeps each page whose
  note matches the outcome (the same failed cells: the page it would draw
  itself) and draws the rest from the strips and the outcome, so at the end
  only the last page to complete is left, and the output is the same whatever
  ran twice or died.

Nothing here fails a batch: a page that cannot be drawn early is logged and
drawn at the fan-in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from PIL import Image

from workers import keys, storage
from workers.contact_sheet import BACKGROUND, CELL, TILE_QUALITY, compose, page_names, pages

log = logging.getLogger(__name__)

#: The tiles of the batch running in this process (image index -> tile), kept by its sheet items.
batch_tiles: ContextVar[dict[int, Image.Image] | None] = ContextVar("batch_tiles", default=None)

#: Where a job's strips of tiles (and page notes) go under its --out until the fan-in deletes them.
TILES_DIR = ".fanout-tiles"
#: Threads reading one page's strips back: Pillow decodes without the GIL.
READERS = 4
#: JPEG quality of a page: 0.04-0.1 s to encode a full page (PNG: 0.5-0.6 s at its fastest
#: level), the failure marker still a solid red cross (docs/performance.md).
PAGE_QUALITY = 90
PAGE_FORMAT = "JPEG"

# KEYS[1]: the set of batches counted, KEYS[2]: page -> sheet items counted.
# ARGV[1]: this batch's first index, ARGV[2]: seconds to keep both, then (page, items) pairs.
# A batch already in the set counts nothing: it ran before.
_COUNT_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return {} end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local counts = {}
for i = 3, #ARGV, 2 do
  counts[#counts + 1] = redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return counts
"""


def tiles_dir(out_dir: str, job_id: str) -> str:
    """The directory (or prefix) of job ``job_id``'s tiles and page notes under ``out_dir``."""
    return storage.join(out_dir, f"{TILES_DIR}/{job_id}")


def write_strip(tiles: str, made: dict[int, Image.Image], images: Sequence[int]) -> str | None:
    """Write one batch's tiles (``made``: image index -> tile) for its sheet items ``images`` as a strip.

    Returns its URL (None if the batch has no sheet item).  An image of ``images``
    without a tile (it failed) is an empty cell, its bit clear in the name.
    """
    if not images:
        return None
    first, count = min(images), max(images) - min(images) + 1
    strip = Image.new("RGB", (CELL * count, CELL), BACKGROUND)
    mask = 0
    for image, tile in made.items():
        if first <= image < first + count:
            j = image - first
            strip.paste(tile, (j * CELL + (CELL - tile.width) // 2, (CELL - tile.height) // 2))
            mask |= 1 << j
    url = storage.join(tiles, f"{first}-{count}-{mask:x}.jpg")
    storage.write_atomic(url, lambda fh: strip.save(fh, format="JPEG", quality=TILE_QUALITY))
    return url


class Strips:
    """The strips in a tiles directory, read on demand: each image's tile, or None."""

    def __init__(self, tiles: str) -> None:
        self.where: dict[int, tuple[str, int]] = {}  # image -> (strip URL, cell)
        try:
            found = storage.list_files(tiles) if storage.exists(tiles) else []
        except OSError:
            found = []
        for url in found:
            name = url.rsplit("/", 1)[-1].removesuffix(".jpg")
            parts = name.split("-")
            if len(parts) != 3 or not url.endswith(".jpg"):
                continue
            try:
                first, count, mask = int(parts[0]), int(parts[1]), int(parts[2], 16)
            except ValueError:
                continue
            for j in range(count):
                if mask >> j & 1:
                    self.where[first + j] = (url, j)
        self._read: dict[str, Image.Image | None] = {}

    def _strip(self, url: str) -> Image.Image | None:
        if url not in self._read:
            try:
                with Image.open(storage.open_source(url)) as im:
                    im.load()
                    self._read[url] = im.convert("RGB")
            except Exception:  # noqa: BLE001 - an unreadable strip: its images are drawn from their outputs
                self._read[url] = None
        return self._read[url]

    def tiles(self, indices: Sequence[int]) -> list[Image.Image | None]:
        """The tiles of images ``indices`` (a CELL x CELL cell each), None where no strip holds one."""
        urls = {self.where[i][0] for i in indices if i in self.where}
        with ThreadPoolExecutor(READERS) as pool:
            list(pool.map(self._strip, sorted(urls)))
        found: list[Image.Image | None] = []
        for i in indices:
            strip = self._strip(self.where[i][0]) if i in self.where else None
            if strip is None:
                found.append(None)
                continue
            j = self.where[i][1]
            found.append(strip.crop((j * CELL, 0, (j + 1) * CELL, CELL)))
        return found


def note_of(tiles: str, page: int) -> str:
    """Where the note of page ``page`` drawn early goes (the cells it drew as failed)."""
    return storage.join(tiles, f"page-{page}.json")


@dataclass(frozen=True)
class Layout:
    """The sheet of ``images`` images: its columns, each page's images and file names."""

    images: int

    @property
    def columns(self) -> int:
        return pages(self.images)[0]

    @property
    def ranges(self) -> list[range]:
        return pages(self.images)[1]

    @property
    def names(self) -> list[str]:
        return page_names(self.images)

    def page_of(self, image: int) -> int:
        return image // len(self.ranges[0])


def save_page(page: Image.Image, url: str) -> None:
    storage.write_atomic(url, lambda fh: page.save(fh, format=PAGE_FORMAT, quality=PAGE_QUALITY))


def count_batch(
    client: Any, group: str, start: int, per_page: dict[int, int], expires: int
) -> dict[int, int]:
    """Count a batch's sheet items (``per_page``: page -> items); return each page's new count.

    Empty if the batch starting at ``start`` was counted before.
    """
    pairs = [str(v) for page, n in per_page.items() for v in (page, n)]
    counts = client.eval(
        _COUNT_LUA, 2, keys.sheet_batches(group), keys.sheet_pages(group), start, expires, *pairs
    )
    return dict(zip(per_page, (int(c) for c in counts), strict=False))


def draw_page(out_dir: str, tiles: str, layout: Layout, page: int) -> list[int]:
    """Draw page ``page`` from the strips in ``tiles``, write it, then its note; return the failed cells."""
    indices = layout.ranges[page]
    read = Strips(tiles).tiles(indices)
    missing = [i for i, tile in zip(indices, read, strict=True) if tile is None]
    save_page(
        compose(read, columns=layout.columns, first=indices.start), storage.join(out_dir, layout.names[page])
    )
    note = json.dumps({"name": layout.names[page], "missing": missing}).encode()
    storage.write_atomic(note_of(tiles, page), lambda fh: fh.write(note))
    return missing


def sheet_images(items: Sequence[Any]) -> list[int]:
    """The images whose sheet items are among ``items``."""
    return [int(item[4]) for item in items if isinstance(item, list) and len(item) > 4]


def batch_done(
    client: Any,
    group: str,
    start: int,
    items: Sequence[Any],
    made: dict[int, Image.Image],
    sheet: dict[str, Any],
    out_dir: str,
    expires: int,
) -> list[int]:
    """After a batch: write its strip of ``made`` tiles, count its sheet items, draw each page it completes.

    Returns the pages it drew.
    """
    images = sheet_images(items)
    if not images:
        return []
    write_strip(str(sheet["tiles"]), made, images)
    layout = Layout(int(sheet["images"]))
    per_page: dict[int, int] = {}
    for image in images:
        page = layout.page_of(image)
        per_page[page] = per_page.get(page, 0) + 1
    counts = count_batch(client, group, start, per_page, expires)
    done = [page for page, count in counts.items() if count == len(layout.ranges[page])]
    for page in done:
        draw_page(out_dir, str(sheet["tiles"]), layout, page)
        log.info("drew contact-sheet page %s of job %s as the job ran", layout.names[page], group)
    return done


def read_note(tiles: str, page: int) -> dict[str, Any] | None:
    """The note of page ``page`` if it was drawn early, else None."""
    try:
        note = json.loads(storage.read_bytes(note_of(tiles, page)))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None
