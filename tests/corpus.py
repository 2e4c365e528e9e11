"""A corpus of broken and unusual image files, generated (nothing downloaded)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from orchestrator.samples import make_photo


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _encoded(im: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()


def broken(directory: Path) -> dict[str, Path]:
    """Files that cannot be resized; each must come back as an error naming it."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = _encoded(Image.new("RGB", (300, 200), (200, 30, 30)), "JPEG")
    png = _encoded(Image.linear_gradient("L").resize((300, 200)), "PNG")
    files = {
        "zero-byte": (directory / "empty.jpg", b""),
        "text-as-jpeg": (directory / "notes.jpg", b"this is a text file, not a photo\n"),
        "truncated-jpeg": (directory / "truncated.jpg", jpeg[: len(jpeg) // 2]),
        "truncated-png": (directory / "truncated.png", png[: len(png) // 2]),
        # Above Pillow's MAX_IMAGE_PIXELS (about 89 M), below twice that: only a warning in Pillow.
        "bomb-warning": (directory / "bomb.png", png_declaring(10_000, 10_000)),
        # 3.6 G pixels declared in a file of under 100 bytes.
        "huge-declared": (directory / "huge.png", png_declaring(60_000, 60_000)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


def unusual(directory: Path) -> dict[str, Path]:
    """Files that are odd but valid; each must be resized correctly."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    cmyk = Image.new("CMYK", (400, 200), (0, 128, 255, 0))
    paths["cmyk-jpeg"] = directory / "cmyk.jpg"
    cmyk.save(paths["cmyk-jpeg"], "JPEG")
    deep = Image.linear_gradient("L").resize((400, 200)).convert("I").point(lambda v: v * 256)
    paths["16-bit-png"] = directory / "deep.png"
    deep.convert("I;16").save(paths["16-bit-png"], "PNG")
    palette = Image.new("P", (400, 200), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    paths["palette-transparent-png"] = directory / "palette.png"
    palette.save(paths["palette-transparent-png"], "PNG", transparency=0)
    frames = [Image.new("RGB", (400, 200), (i * 80, 0, 0)) for i in range(3)]
    paths["animated-gif"] = directory / "animated.gif"
    frames[0].save(
        paths["animated-gif"], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
    )
    # An Exif segment whose IFD points far outside the segment.
    bad_exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + b"\x00" * 16
    paths["broken-exif"] = directory / "bad-exif.jpg"
    Image.new("RGB", (400, 200), (10, 200, 10)).save(paths["broken-exif"], "JPEG", exif=bad_exif)
    for orientation in range(1, 9):
        paths[f"orientation-{orientation}"] = make_photo(
            directory / f"orient-{orientation}.jpg", (400, 200), seed=orientation, orientation=orientation
        )
    return paths
