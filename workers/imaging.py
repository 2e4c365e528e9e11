"""The simplest resize: fit within a square, by path.  A shorthand over :mod:`workers.resizing`."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from workers.resizing import ResizeOptions, resize_to

#: File name endings ``fanout resize`` treats as images when it walks a directory: those
#: of the formats Pillow decodes (docs/formats.md).  A file named directly is sent whatever
#: its name; Pillow identifies images by their content.
# fmt: off
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".gif", ".webp", ".avif",
    ".bmp", ".dib", ".tif", ".tiff", ".jp2", ".j2k", ".jpc", ".jpf", ".jpx", ".j2c",
    ".ico", ".cur", ".icns", ".tga", ".pcx", ".dcx", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm",
    ".qoi", ".sgi", ".bw", ".rgb", ".rgba", ".dds", ".blp", ".im", ".msp", ".xbm", ".xpm",
    ".psd", ".fits", ".fit", ".ras", ".pcd", ".pxr", ".spi", ".eps", ".fli", ".flc",
    ".ftc", ".ftu", ".gbr",
})
# fmt: on


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
