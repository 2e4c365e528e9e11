"""The contact sheet drawn while the job runs: each page as soon as its tiles exist.

A resize job with a sheet gives each image one *sheet item* (its smallest
box), which carries the image's index; that item's tile is written to
:func:`tile_of` in the job's tiles directory.  Then, per page of
:data:`~workers.contact_sheet.PAGE_MAX` pixels (960 images):

* after each batch, its header counts the batch's sheet items per page in
  Redis, in one round trip (:func:`count_batch`): a set of the batches already
  counted makes a batch that runs twice (redelivered, or sent again by the
  healer) count once;
* the batch that brings a page's count to its number of images draws the page
  from the tiles (:func:`draw_page`: a missing tile is drawn as a failed cell),
  writes it under its final name, then a note of the cells it drew as failed;
* at the fan-in, :func:`workers.report.write_report` keeps each page whose
  note matches the outcome (the same failed cells: the page it would draw
  itself) and draws the rest as before, so at the end only the last page to
  complete is left, and the output is the same whatever ran twice or died.

Nothing here fails a batch: a page that cannot be drawn early is logged and
drawn at the fan-in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from workers import keys, storage
from workers.contact_sheet import compose, page_names, pages, read_tile

log = logging.getLogger(__name__)

#: Where a job's tiles (and page notes) go under its --out until the fan-in deletes them.
TILES_DIR = ".fanout-tiles"
#: Threads reading one page's tiles back: Pillow decodes without the GIL.
READERS = 4
#: JPEG quality of a page: 0.04 s to encode a full page (PNG: 0.5 s at its fastest level),
#: the failure marker still a solid red cross (docs/performance.md).
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


def tile_of(tiles: str, image: int) -> str:
    """Where image ``image``'s tile goes in ``tiles``."""
    return storage.join(tiles, f"{image}.jpg")


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
    """Draw page ``page`` from the tiles in ``tiles``, write it, then its note; return the failed cells."""
    indices = layout.ranges[page]
    with ThreadPoolExecutor(READERS) as pool:
        read = list(pool.map(read_tile, [tile_of(tiles, i) for i in indices]))
    missing = [i for i, tile in zip(indices, read, strict=True) if tile is None]
    save_page(
        compose(read, columns=layout.columns, first=indices.start), storage.join(out_dir, layout.names[page])
    )
    note = json.dumps({"name": layout.names[page], "missing": missing}).encode()
    storage.write_atomic(note_of(tiles, page), lambda fh: fh.write(note))
    return missing


def batch_done(
    client: Any,
    group: str,
    start: int,
    items: Sequence[Any],
    sheet: dict[str, Any],
    out_dir: str,
    expires: int,
) -> list[int]:
    """After a batch: count its sheet items, and draw each page it completes; return those pages."""
    layout = Layout(int(sheet["images"]))
    per_page: dict[int, int] = {}
    for item in items:
        if isinstance(item, list) and len(item) > 4:  # the sheet item of image item[4]
            page = layout.page_of(int(item[4]))
            per_page[page] = per_page.get(page, 0) + 1
    if not per_page:
        return []
    counts = count_batch(client, group, start, per_page, expires)
    done = [page for page, count in counts.items() if count == len(layout.ranges[page])]
    for page in done:
        draw_page(out_dir, str(sheet["tiles"]), layout, page)
    return done


def read_note(tiles: str, page: int) -> dict[str, Any] | None:
    """The note of page ``page`` if it was drawn early, else None."""
    try:
        note = json.loads(storage.read_bytes(note_of(tiles, page)))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None
