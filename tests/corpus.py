"""Generated image corpora (nothing downloaded): broken, unusual, and every format x mode x codec."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, PngImagePlugin

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


# --------------------------------------------------------------------------- orientation, by decoder

#: How every oriented source shows: the shape of Pillow's own ``g4_orientation_*.tif``.
SHOWN_SIZE = (590, 88)
#: The dark block each oriented source shows in its top-left corner, on white.
MARKER_BOX = (0, 0, SHOWN_SIZE[0] // 3, SHOWN_SIZE[1] // 2)
#: What undoes each orientation: the source stores ``shown.transpose(_STORED[o])``, so
#: that applying the orientation once (``ImageOps.exif_transpose``) shows the picture.
_STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # shown by ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # shown by ROTATE_90
}
#: Each decoder that reads an orientation, and whether it applies it itself as it loads:
#: Pillow's TIFF reader does, through libtiff (Group 4, LZW) or its own decoder (raw).
ORIENTING_DECODERS = {
    "tiff-group4": True,
    "tiff-lzw": True,
    "tiff-raw": True,
    "jpeg": False,
    "png-exif": False,
    "png-xmp": False,
    "webp": False,
    "avif": False,
}


@dataclass(frozen=True)
class OrientedCase:
    """A source that shows :data:`SHOWN_SIZE` with the marker top-left once ``orientation`` is applied."""

    name: str
    path: Path
    decoder: str
    orientation: int


def _shown(mode: str) -> Image.Image:
    im = Image.new(mode, SHOWN_SIZE, "white")
    ImageDraw.Draw(im).rectangle(MARKER_BOX, fill="black")
    return im


def _xmp(orientation: int) -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>'
    )


def oriented(directory: Path) -> list[OrientedCase]:
    """Every decoder of :data:`ORIENTING_DECODERS` in all eight orientations, a few KB each."""
    directory.mkdir(parents=True, exist_ok=True)
    cases = []
    for decoder in ORIENTING_DECODERS:
        shown = _shown("1" if decoder in ("tiff-group4", "tiff-raw") else "RGB")
        for orientation in range(1, 9):
            stored = shown.transpose(_STORED[orientation]) if orientation in _STORED else shown
            exif = Image.Exif()
            exif[0x0112] = orientation
            name = f"{decoder}-{orientation}"
            fmt, _, codec = decoder.partition("-")
            path = directory / f"{name}.{fmt}"
            if fmt == "tiff":
                stored.save(
                    path,
                    "TIFF",
                    compression={"lzw": "tiff_lzw"}.get(codec, codec),
                    tiffinfo={0x0112: orientation},
                )
            elif codec == "xmp":
                info = PngImagePlugin.PngInfo()
                info.add_itxt("XML:com.adobe.xmp", _xmp(orientation))
                stored.save(path, "PNG", pnginfo=info)
            else:
                stored.save(path, fmt.upper(), exif=exif)  # AVIF stores it as irot/imir boxes
            cases.append(OrientedCase(name, path, decoder, orientation))
    return cases


# --------------------------------------------------------------------------- formats x modes x codecs

#: Every generated source is this size; ``fanout resize --max-side 24`` makes it 24 x 16.
SOURCE_SIZE = (48, 32)


@dataclass(frozen=True)
class FormatCase:
    """One generated file and what resizing it with ``format keep`` must give.

    ``mode`` is the output's mode as Pillow reads it back; ``error`` (when set)
    is a fragment of the reason a case that cannot work fails with.
    """

    name: str
    path: Path
    fmt: str  # the output's format as Pillow reads it back
    mode: str
    error: str = ""
    size: tuple[int, int] = SOURCE_SIZE  # the source's size as Pillow opens it


def _picture() -> Image.Image:
    """A small RGB picture with colour, edges and a gradient, the same every time."""
    im = Image.merge(
        "RGB",
        [
            Image.linear_gradient("L").resize(SOURCE_SIZE),
            Image.linear_gradient("L").rotate(90).resize(SOURCE_SIZE),
            Image.radial_gradient("L").resize(SOURCE_SIZE),
        ],
    )
    draw = ImageDraw.Draw(im)
    draw.rectangle((4, 4, 20, 14), fill=(250, 20, 20))
    draw.ellipse((26, 10, 44, 28), fill=(20, 20, 240))
    return im


def _alpha() -> Image.Image:
    """An alpha channel: opaque centre, fully transparent corners, partial in between."""
    alpha = Image.radial_gradient("L").resize(SOURCE_SIZE).point(lambda v: 255 - v)
    ImageDraw.Draw(alpha).rectangle((0, 0, 6, 6), fill=0)
    return alpha


def sources() -> dict[str, Image.Image]:
    """The picture in every mode a format may store (``P+t``: palette with a transparent index)."""
    rgb = _picture()
    grey = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(_alpha())
    la = grey.copy()
    la.putalpha(_alpha())
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.paste(0, (0, 0, 8, 8))
    transparent.info["transparency"] = 0
    wide = grey.convert("I")
    return {
        "1": grey.convert("1"),
        "L": grey,
        "LA": la,
        "P": palette,
        "P+t": transparent,
        "RGB": rgb,
        "RGBA": rgba,
        "I;16": wide.point(lambda v: v * 257).convert("I;16"),
        "I": wide.point(lambda v: v * 1000),
        "F": grey.convert("F").point(lambda v: v / 255),
        "CMYK": rgb.convert("CMYK"),
    }


def _png16_rgb() -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow reads these but writes only 8 bits per channel)."""
    width, height = SOURCE_SIZE
    data = _picture().tobytes()  # 8-bit RGB, row after row
    stride = width * 3
    rows = b"".join(
        b"\x00" + b"".join(struct.pack(">H", v * 257) for v in data[y * stride : (y + 1) * stride])
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _bmp_rle(bits: int) -> bytes:
    """A palette BMP compressed with RLE8 (``bits`` 8) or RLE4 (4), which Pillow reads but does not write."""
    width, height = SOURCE_SIZE
    colours = 1 << bits
    grey = _picture().convert("L").tobytes()
    data = bytearray()
    for y in range(height - 1, -1, -1):  # bottom-up
        levels = [v * colours // 256 for v in grey[y * width : (y + 1) * width]]
        x = 0
        while x < width:
            run = 1
            while x + run < width and run < 255 and levels[x + run] == levels[x]:
                run += 1
            # An encoded run: count, then the index (RLE4: two indices packed, both the same here).
            data += bytes((run, levels[x] if bits == 8 else levels[x] << 4 | levels[x]))
            x += run
        data += b"\x00\x00"  # end of line
    data += b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes((v, v, v, 0)) for v in (i * 255 // (colours - 1) for i in range(colours)))
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, 1 if bits == 8 else 2, len(data), 2835, 2835, colours, 0
    )
    offset = 14 + len(info) + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset)
    return header + info + palette + bytes(data)


def _xpm() -> bytes:
    """A two-colour XPM: a format Pillow reads but cannot write."""
    width, height = SOURCE_SIZE
    grey = _picture().convert("L").tobytes()
    rows = ",\n".join(
        '"' + "".join("#" if v > 127 else "." for v in grey[y * width : (y + 1) * width]) + '"'
        for y in range(height)
    )
    head = f'"{width} {height} 2 1",\n". c #000000",\n"# c #ffffff",\n'
    return f"/* XPM */\nstatic char *x[] = {{\n{head}{rows}\n}};\n".encode()


def _icns() -> bytes:
    """An ICNS holding one 32 x 32 PNG icon (Pillow's own writer makes every size up to 1024)."""
    icon = io.BytesIO()
    _picture().convert("RGBA").resize((32, 32)).save(icon, "PNG")
    entry = b"icp5" + struct.pack(">I", 8 + len(icon.getvalue())) + icon.getvalue()
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def _frames(im: Image.Image, count: int = 3) -> list[Image.Image]:
    return [im.rotate(20 * i) if im.mode != "P" else im.copy() for i in range(count)]


def _ghostscript() -> bool:
    from PIL import EpsImagePlugin

    return bool(EpsImagePlugin.has_ghostscript())


def formats(directory: Path, write: bool = True) -> list[FormatCase]:
    """Every format Pillow reads and writes, in each mode it stores, with each codec option.

    Files are 48 x 32 pixels, a few KB each (400 KB in all); with ``write``
    false only the cases are listed (for parametrizing).
    """
    if write:
        directory.mkdir(parents=True, exist_ok=True)
    src = sources()
    cases: list[FormatCase] = []

    def add(
        name: str,
        suffix: str,
        image: Image.Image | bytes,
        fmt: str,
        mode: str,
        size: tuple[int, int] = SOURCE_SIZE,
        **save: Any,
    ) -> None:
        path = directory / f"{name}{suffix}"
        if not write:
            pass
        elif isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path, save.pop("save_as", None), **save)
        error = ""
        if fmt == "EPS" and not _ghostscript():
            error = "needs Ghostscript"
        cases.append(FormatCase(name, path, fmt, mode, error, size))

    def each(fmt: str, suffix: str, expected: dict[str, str], **save: Any) -> None:
        tag = fmt.lower()
        for mode, out in expected.items():
            add(f"{tag}-{mode.replace(';', '')}", suffix, src[mode], fmt, out, save_as=fmt, **save)

    # PNG: every mode it stores, tRNS in 1/L/RGB/16-bit, 16-bit RGB, a 4-bit palette, APNG.
    each("PNG", ".png", {"1": "L", "L": "L", "LA": "LA", "P": "RGB", "P+t": "RGBA", "RGB": "RGB",
                         "RGBA": "RGBA", "I;16": "I;16"})  # fmt: skip
    add("png-1-trns", ".png", src["1"], "PNG", "LA", transparency=0)
    add("png-L-trns", ".png", src["L"], "PNG", "LA", transparency=src["L"].tobytes()[0])
    add("png-RGB-trns", ".png", src["RGB"], "PNG", "RGBA", transparency=tuple(src["RGB"].tobytes()[:3]))
    add(
        "png-I16-trns",
        ".png",
        src["I;16"],
        "PNG",
        "LA",
        transparency=int.from_bytes(src["I;16"].tobytes()[:2], "little"),
    )
    add("png-RGB-16bit", ".png", _png16_rgb(), "PNG", "RGB")
    add(
        "png-P-4bit",
        ".png",
        src["RGB"].convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "PNG",
        "RGB",
        bits=4,
    )
    add("png-apng", ".png", src["RGBA"], "PNG", "RGBA", save_all=True, append_images=_frames(src["RGBA"])[1:])

    # JPEG: the modes it stores, progressive, and MPO (several pictures; the first is kept as JPEG).
    each("JPEG", ".jpg", {"L": "L", "RGB": "RGB", "CMYK": "CMYK"})
    add("jpeg-1", ".jpg", src["1"], "JPEG", "L")
    add("jpeg-progressive", ".jpg", src["RGB"], "JPEG", "RGB", progressive=True)
    add("mpo-RGB", ".mpo", src["RGB"], "JPEG", "RGB", save_as="MPO", save_all=True,
        append_images=_frames(src["RGB"])[1:])  # fmt: skip

    # GIF: palette, transparency, greyscale, animation with and without transparency.
    each("GIF", ".gif", {"P": "P", "P+t": "P", "L": "P", "1": "P"})
    add("gif-animated", ".gif", src["P"], "GIF", "P", save_all=True,
        append_images=[src["RGB"].rotate(30), src["RGB"].rotate(60)], duration=80, loop=0)  # fmt: skip
    add("gif-animated-trns", ".gif", src["P+t"], "GIF", "P", save_all=True,
        append_images=[src["P+t"].copy()], duration=80, transparency=0, disposal=2)  # fmt: skip

    # TIFF: each mode, crossed with each compression that mode takes; several pages.
    tiff = {
        "1": ("L", ["raw", "group3", "group4", "packbits", "tiff_lzw", "tiff_adobe_deflate"]),
        "L": ("L", ["raw", "packbits", "tiff_lzw", "tiff_adobe_deflate", "jpeg"]),
        "LA": ("LA", ["raw", "tiff_lzw"]),
        "P": ("RGB", ["raw", "tiff_lzw"]),
        "RGB": ("RGB", ["raw", "packbits", "tiff_lzw", "tiff_adobe_deflate", "jpeg"]),
        "RGBA": ("RGBA", ["raw", "packbits", "tiff_lzw", "tiff_adobe_deflate"]),
        "I;16": ("I;16", ["raw", "tiff_lzw", "tiff_adobe_deflate"]),
        "I": ("I", ["raw", "tiff_lzw"]),
        "F": ("F", ["raw", "tiff_lzw"]),
        "CMYK": ("CMYK", ["raw", "tiff_lzw", "jpeg"]),
    }
    for mode, (out, compressions) in tiff.items():
        for compression in compressions:
            add(f"tiff-{mode.replace(';', '')}-{compression}", ".tif", src[mode], "TIFF", out,
                compression=compression)  # fmt: skip
    add("tiff-pages", ".tif", src["RGB"], "TIFF", "RGB", save_all=True, append_images=_frames(src["RGB"])[1:])
    # TIFF with an orientation that turns it a quarter: Pillow's reader applies it as it
    # loads, through libtiff (Group 4, LZW) and through its own decoder (raw) alike, and
    # opens it at the size it shows (48 x 32): it must not be turned again.
    for orientation in (5, 6, 7, 8):
        for mode, out, compression in (("1", "L", "group4"), ("1", "L", "raw"), ("RGB", "RGB", "tiff_lzw")):
            stored = src[mode].transpose(_STORED[orientation])
            add(f"tiff-{mode}-{compression}-orientation-{orientation}", ".tif", stored, "TIFF", out,
                compression=compression, tiffinfo={0x0112: orientation})  # fmt: skip

    # WebP: lossy, lossless, alpha, animation; greyscale is stored as RGB.
    each("WEBP", ".webp", {"RGB": "RGB", "RGBA": "RGBA", "L": "RGB"})
    add("webp-lossless", ".webp", src["RGBA"], "WEBP", "RGBA", lossless=True)
    add("webp-animated", ".webp", src["RGBA"], "WEBP", "RGBA", save_all=True,
        append_images=_frames(src["RGBA"])[1:], duration=80)  # fmt: skip

    # BMP and DIB: the modes Pillow writes, and RLE8/RLE4, which only it reads.
    each("BMP", ".bmp", {"1": "L", "L": "L", "P": "RGB", "RGB": "RGB", "RGBA": "RGB"})
    add("bmp-rle8", ".bmp", _bmp_rle(8), "BMP", "L")  # a grey palette of 256 is read as L
    add("bmp-rle4", ".bmp", _bmp_rle(4), "BMP", "RGB")
    each("DIB", ".dib", {"RGB": "RGB"})

    # Icons: ICO in its modes and with several sizes; ICNS (sizes fixed by Pillow) becomes PNG.
    each("ICO", ".ico", {"RGBA": "RGBA", "RGB": "RGB", "LA": "LA", "P": "RGB"})
    add("ico-sizes", ".ico", src["RGBA"], "ICO", "RGBA", sizes=[(16, 16), (32, 32), (48, 48)])
    add("icns-RGBA", ".icns", _icns(), "PNG", "RGBA", size=(32, 32))

    # The other formats Pillow both reads and writes, in the modes each stores.
    each("PCX", ".pcx", {"1": "L", "L": "L", "P": "RGB", "RGB": "RGB"})
    each("TGA", ".tga", {"1": "L", "L": "L", "LA": "LA", "P": "RGB", "RGB": "RGB", "RGBA": "RGBA"})
    add("tga-rle", ".tga", src["RGBA"], "TGA", "RGBA", compression="tga_rle")
    each("SGI", ".sgi", {"L": "L", "RGB": "RGB", "RGBA": "RGBA"})
    add("sgi-rle", ".sgi", src["RGB"], "SGI", "RGB", rle=True)  # ignored if Pillow writes only raw
    each("PPM", ".ppm", {"1": "L", "L": "L", "RGB": "RGB", "I;16": "I", "F": "F"})
    each("QOI", ".qoi", {"RGB": "RGB", "RGBA": "RGBA"})
    each("DDS", ".dds", {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"})
    for pixel_format in ("DXT1", "DXT3", "DXT5"):
        add(f"dds-{pixel_format.lower()}", ".dds", src["RGBA"], "DDS", "RGBA", pixel_format=pixel_format)
    each("JPEG2000", ".jp2", {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "I;16": "I;16"})
    add("jpeg2000-j2k", ".j2k", src["RGB"], "JPEG2000", "RGB", save_as="JPEG2000")
    each("AVIF", ".avif", {"L": "L", "RGB": "RGB", "RGBA": "RGBA"})
    each("IM", ".im", {"1": "L", "L": "L", "LA": "LA", "P": "RGB", "RGB": "RGB", "RGBA": "RGBA",
                       "I;16": "I;16", "I": "I", "F": "F", "CMYK": "CMYK"})  # fmt: skip
    each("SPIDER", ".spi", {"F": "F", "L": "F"})
    each("MSP", ".msp", {"1": "1"})
    each("XBM", ".xbm", {"1": "1"})
    add("blp-blp2", ".blp", src["P"], "BLP", "RGB", save_as="BLP")
    add("blp-blp1", ".blp", src["P"], "BLP", "RGB", save_as="BLP", blp_version="BLP1")
    each("EPS", ".eps", {"L": "L", "RGB": "RGB", "CMYK": "CMYK"})

    # Read-only: written as PNG by keep.
    add("xpm-read-only", ".xpm", _xpm(), "PNG", "RGB")  # read as a palette image
    return cases
