"""The contact sheet: every item's thumbnail in input order on one image, failures marked.

``compose`` is pure (images in, image out); ``thumbnail`` reads one output back
through :mod:`workers.storage`.  The chord callback writes the sheet next to
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


def columns_for(count: int) -> int:
    """Grid columns for ``count`` tiles: a roughly 4:3 sheet, at most MAX_COLUMNS wide."""
    return max(1, min(count, MAX_COLUMNS, math.ceil(math.sqrt(count * 4 / 3))))


def cell_origin(index: int, columns: int, cell: int = CELL) -> tuple[int, int]:
    """Top-left corner of tile ``index`` (row-major, input order)."""
    row, col = divmod(index, columns)
    return GAP + col * (cell + GAP), GAP + row * (cell + GAP)


def compose(tiles: Sequence[Image.Image | None], cell: int = CELL, columns: int | None = None) -> Image.Image:
    """One RGB image with ``tiles`` in a grid in order; ``None`` is a failed item, drawn as a red cross."""
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
            thumb = tile.convert("RGB") if tile.mode != "RGB" else tile.copy()
            thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        label = str(index)
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
