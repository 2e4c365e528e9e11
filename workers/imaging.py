"""The simplest resize: fit within a square, by path.  A shorthand over :mod:`workers.resizing`."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from workers.resizing import ResizeOptions, resize_to

#: File name endings ``fanout resize`` treats as images when it walks a directory.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


class ResizeRecord(TypedDict):
    source: str
    destination: str
    width: int
    height: int
    bytes: int


def resize_image(source: str | Path, destination: str | Path, max_side: int) -> ResizeRecord:
    """Write ``source`` scaled to fit within ``max_side`` x ``max_side`` to ``destination``.

    The aspect ratio is kept, the EXIF orientation applied, the format kept; an
    image already small enough is not enlarged.  The output appears under its
    final name only once complete (temporary file, then rename), so running
    twice is harmless.  Raises :class:`~workers.errors.ImageError` for an input
    that cannot work and :class:`~workers.errors.TransientError` for I/O worth
    another try.
    """
    record = resize_to(str(source), str(destination), (max_side, max_side), ResizeOptions())
    return {
        "source": record["source"],
        "destination": record["destination"],
        "width": record["width"],
        "height": record["height"],
        "bytes": record["bytes"],
    }
