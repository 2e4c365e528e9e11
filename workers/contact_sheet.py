"""The contact sheet: every item's thumbnail in input order, failures marked, in pages.

Each header task makes its images' tiles while the image is in memory
(:func:`make_tile`, written as one strip a batch by :mod:`workers.sheets`), so
a page is pasted from small tiles (:func:`compose`, pure: images in, image
out).  :func:`thumbnail` reads an output back, the fallback for a tile that is
missing.  A sheet is cut into pages of at most :data:`PAGE_MAX`
pixels a side (:func:`pages`), a size every viewer opens.  Each page is drawn
as soon as its tiles exist (:mod:`workers.sheets`), and written next to
``manifest.json`` (see :mod:`workers.report`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from PIL import Image, ImageDraw

from workers import storage

#: Side of one grid cell, pixels: big enough to recognise a photo, small enough for 500 on a screen.
CELL = 128
GAP = 4
MAX_COLUMNS = 16
BACKGROUND = (24, 24, 24)
FAILED_FILL = (64, 64, 64)
#: The failure marker: a red cross over the cell, and a red frame.
MARKER = (220, 30, 30)
#: Largest side of one page, pixels: browsers and common viewers open 8,000 x 8,000.
PAGE_MAX = 8000
#: JPEG quality of a tile: a 128 px tile is 3-5 KB, decoded in about 0.1 ms.
TILE_QUALITY = 80
#: The sheet's file name: JPEG pages, as PNG took 0.5 s to encode a full page and JPEG 0.04 s.
CONTACT_SHEET = "contact-sheet.jpg"


def columns_for(count: int) -> int:
    """Grid columns for ``count`` tiles: a roughly 4:3 sheet, at most MAX_COLUMNS wide."""
    return max(1, min(count, MAX_COLUMNS, math.ceil(math.sqrt(count * 4 / 3))))


def cell_origin(index: int, columns: int, cell: int = CELL) -> tuple[int, int]:
    """Top-left corner of tile ``index`` (row-major, input order)."""
    row, col = divmod(index, columns)
    return GAP + col * (cell + GAP), GAP + row * (cell + GAP)


def rows_per_page(cell: int = CELL) -> int:
    """Grid rows that fit in a page of :data:`PAGE_MAX` pixels."""
    return max(1, (PAGE_MAX - GAP) // (cell + GAP))


def pages(count: int, cell: int = CELL) -> tuple[int, list[range]]:
    """The grid's columns and each page's tile indices, in order, for ``count`` tiles."""
    columns = columns_for(count)
    per_page = columns * rows_per_page(cell)
    starts = range(0, max(1, count), per_page)
    return columns, [range(first, min(first + per_page, count)) for first in starts]


def page_names(count: int) -> list[str]:
    """The sheet's file names for ``count`` images: one page keeps the plain name."""
    _, ranges = pages(count)
    if len(ranges) == 1:
        return [CONTACT_SHEET]
    stem, dot, suffix = CONTACT_SHEET.rpartition(".")
    return [f"{stem}-{n}{dot}{suffix}" for n in range(1, len(ranges) + 1)]


def compose(
    tiles: Sequence[Image.Image | None], cell: int = CELL, columns: int | None = None, first: int = 0
) -> Image.Image:
    """One RGB image with ``tiles`` in a grid in order; ``None`` is a failed item, drawn as a red cross.

    Tiles are labelled with their index, counting from ``first`` (the page's first item).
    """
    count = max(1, len(tiles))
    cols = columns or columns_for(count)
    rows = math.ceil(count / cols)
    sheet = Image.new("RGB", (GAP + cols * (cell + GAP), GAP + rows * (cell + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, tile in enumerate(tiles):
        x, y = cell_origin(index, cols, cell)
        if tile is None:
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=FAILED_FILL, outline=MARKER, width=3)
            width = max(3, cell // 16)
            draw.line((x + 8, y + 8, x + cell - 9, y + cell - 9), fill=MARKER, width=width)
            draw.line((x + 8, y + cell - 9, x + cell - 9, y + 8), fill=MARKER, width=width)
        else:
            thumb = tile
            if tile.mode != "RGB" or max(tile.size) > cell:  # a tile from make_tile is neither
                thumb = tile.convert("RGB") if tile.mode != "RGB" else tile.copy()
                thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        label = str(first + index)
        draw.rectangle((x, y, x + 6 * len(label) + 3, y + 11), fill=BACKGROUND)
        draw.text((x + 2, y), label, fill=(235, 235, 235))
    return sheet


def thumbnail(url: str, cell: int = CELL) -> Image.Image | None:
    """The image at ``url`` reduced to fit a cell, or ``None`` if it cannot be read back."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(storage.open_source(url)) as im:
                im.draft("RGB", (cell * 2, cell * 2))
                if im.mode in ("RGBA", "LA", "P"):
                    rgba = im.convert("RGBA")
                    flat = Image.new("RGB", rgba.size, BACKGROUND)
                    flat.paste(rgba, mask=rgba.getchannel("A"))
                    im_rgb = flat
                else:
                    im_rgb = im.convert("RGB")
                im_rgb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
                return im_rgb
    except Exception:  # noqa: BLE001 - an unreadable output is drawn as failed, not fatal
        return None


def make_tile(im: Image.Image, cell: int = CELL) -> Image.Image:
    """``im`` as a contact-sheet tile: RGB, alpha over the sheet's background, within ``cell``.

    Runs in the header task for every output, so it is cheap: a box-filter
    ``reduce`` by a whole factor, then at most a small bilinear step (0.03 ms
    for a 256 px output, five times less than ``thumbnail``).
    """
    if im.mode.startswith("I"):
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")  # 16-bit range into 8 bits
    elif im.mode in ("F", "1"):
        im = im.convert("L")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if im.mode in ("P", "PA") else "RGB")
    width, height = im.size
    scale = min(cell / width, cell / height, 1.0)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    factor = min(width // target[0], height // target[1])
    if factor >= 2:
        im = im.reduce(factor)
    if im.size != target:
        im = im.resize(target, Image.Resampling.BILINEAR)
    if im.mode in ("RGBA", "LA"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB")
