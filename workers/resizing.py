"""Resize options: modes, several sizes, output format and quality, by URL.

``resize_to(source, destination, box, options)`` is the plain function behind
the ``fanout.resize_items`` task: one image to one target box.

- **fit** (default): the whole image within the box, aspect kept.
- **fill**: cover the box and crop to exactly its size around the ``anchor``.
- **exact**: stretched to the box, aspect ignored.

Nothing is enlarged unless ``upscale`` is set: an image smaller than the box is
kept at its own size (fit), cropped to the box's aspect ratio at its own scale
(fill), or has only its larger-than-box sides reduced (exact).  It is still
re-encoded, so the format, quality and metadata rules below hold for it too.

The EXIF orientation is applied exactly once: by the reader (Pillow's TIFF
reader turns the picture as it loads) or else here.  The ICC colour profile is
kept; all other metadata (EXIF, XMP, text chunks) is dropped.  Alpha is
flattened onto ``background`` when the output format (JPEG) has none.  JPEG sources are
decoded at a reduced scale (``draft``) when the box is much smaller, and
Pillow's decompression-bomb limit stays on.

``format keep`` writes the source's format in a mode it stores (:data:`WRITES`),
with save parameters chosen for the output, never carried over from the source:
a Group 4 TIFF is resampled in greyscale and written with LZW; transparency
becomes an alpha channel before resampling and is written the way the output
format holds it.  A format Pillow reads but cannot write (PSD, ICNS as sized
by Pillow, ...) is written as PNG.  docs/formats.md lists every case.

Given ``seen``, it is called with each output image still in memory: the
contact sheet makes its tile from it (:mod:`workers.sheets`) without reading
the output back.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any, TypedDict

from PIL import Image, ImageColor, ImageFile, ImageMath, ImageOps, UnidentifiedImageError

from workers import storage
from workers.errors import ConfigError, ImageError, InputError, TransientError

MODES = ("fit", "fill", "exact")
#: Where a fill crop is taken from: (x, y) as fractions of the spare width and height.
ANCHORS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top": (0.5, 0.0),
    "bottom": (0.5, 1.0),
    "left": (0.0, 0.5),
    "right": (1.0, 0.5),
    "top-left": (0.0, 0.0),
    "top-right": (1.0, 0.0),
    "bottom-left": (0.0, 1.0),
    "bottom-right": (1.0, 1.0),
}
#: ``--format`` choices and the Pillow format each writes (``keep``: the source's own).
FORMATS: dict[str, str | None] = {"keep": None, "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
#: File name ending for each output format when it differs from the source's.
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}

#: The modes each format Pillow writes stores as they are; an output in another mode
#: is converted to the nearest of them (see :func:`fit_mode`).  GIF and BLP take
#: RGB(A) and make the palette themselves (GIF: a transparent index from alpha).
WRITES: dict[str, frozenset[str]] = {
    name: frozenset(modes.split())
    for name, modes in {
        "AVIF": "L RGB RGBA",
        "BLP": "P",
        "BMP": "L RGB",  # Pillow writes RGBA as 32-bit BMP that readers, Pillow included, show opaque
        "DDS": "L LA RGB RGBA",
        "DIB": "L RGB",
        "EPS": "L RGB CMYK",
        "GIF": "L RGB RGBA",
        "ICO": "L LA RGB RGBA",
        "IM": "L LA RGB RGBA I;16 I F CMYK",
        "JPEG": "L RGB CMYK",
        "JPEG2000": "L LA RGB RGBA I;16 CMYK",
        "MSP": "1",
        "PCX": "L RGB",
        "PNG": "L LA RGB RGBA I;16",
        "PPM": "L RGB I F",
        "QOI": "RGB RGBA",
        "SGI": "L RGB RGBA",
        "SPIDER": "F",
        "TGA": "L LA RGB RGBA",
        "TIFF": "L LA RGB RGBA I;16 I F CMYK",
        "WEBP": "RGB RGBA",
        "XBM": "1",
    }.items()
}
#: What ``keep`` writes for a source format it cannot write as it is: MPO (a
#: multi-picture JPEG) keeps its first picture as a plain JPEG; anything else
#: Pillow reads but cannot write (PSD, XPM, ...), or writes only in fixed square
#: sizes (ICNS), becomes PNG.
KEEP_AS = {"MPO": "JPEG"}
FALLBACK_FORMAT = "PNG"
#: ICO stores sides up to 256 pixels; a larger output is reduced to fit.
ICO_MAX = 256
#: TIFF compressions carried over from the source, with the output modes each can
#: encode (``None``: any).  Anything else, or a mode the codec cannot take (Group 4
#: after resampling a 1-bit page in greyscale), is written with LZW.
_TIFF_COMPRESSIONS: dict[str, frozenset[str] | None] = {
    "raw": None,
    "tiff_lzw": None,
    "packbits": None,
    "tiff_adobe_deflate": None,
    "tiff_deflate": None,
    "jpeg": frozenset({"L", "RGB", "CMYK"}),
}
_TIFF_DEFAULT = "tiff_lzw"

log = logging.getLogger(__name__)

#: errno values worth another try: the file system or network hiccuped.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR, errno.ENOSPC}
)
#: JPEG is decoded at the smallest DCT scale still at least this many times the
#: needed size: 1.0 decodes a 1920 px photo at 480 px for a 256 px output, about
#: twice as fast as 2.0 (960 px), and Lanczos then does the rest (measured in bench/).
_DRAFT_GAP = 1.0
#: Resampling reduces by whole factors first, down to this many times the target (as thumbnail()).
_REDUCING_GAP = 2.0
#: EXIF orientations that swap width and height.
_TRANSPOSED = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ResizeOptions:
    """How every image of a run is resized; travels in the task message as a small dict."""

    mode: str = "fit"
    anchor: str = "center"
    format: str = "keep"
    quality: int = 85
    upscale: bool = False
    background: str = "#ffffff"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.anchor not in ANCHORS:
            raise InputError(f"anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        if self.format not in FORMATS:
            raise InputError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise InputError(f"quality must be 1..100, got {self.quality}")
        try:
            ImageColor.getrgb(self.background)
        except ValueError as exc:  # a colour Pillow does not know
            raise InputError(f"background: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ResizeOptions:
        known = {k: document[k] for k in cls.__dataclass_fields__ if k in document}
        return cls(**known)


class OutputRecord(TypedDict):
    source: str
    destination: str
    box: list[int]  # the requested [width, height]
    width: int
    height: int
    format: str
    bytes: int
    seconds: float


def output_size(size: tuple[int, int], box: tuple[int, int], mode: str, upscale: bool) -> tuple[int, int]:
    """The output's size for an image of ``size`` (as displayed) resized into ``box``."""
    (w, h), (bw, bh) = size, box
    if mode == "exact":
        return (bw, bh) if upscale else (min(bw, w), min(bh, h))
    if mode == "fill":
        if upscale or (bw <= w and bh <= h):
            return bw, bh
        # Too small to cover the box: the largest box-shaped crop at the image's own scale.
        k = min(w / bw, h / bh, 1.0)
        return max(1, round(bw * k)), max(1, round(bh * k))
    if mode != "fit":
        raise ValueError(f"unknown mode {mode!r}")
    scale = min(bw / w, bh / h)
    if not upscale:
        scale = min(scale, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def output_format(source_format: str | None, choice: str) -> str:
    """The Pillow format written for ``choice``; ``keep``: the source's if Pillow writes it, else PNG."""
    chosen = FORMATS[choice]
    if chosen:
        return chosen
    fmt = KEEP_AS.get(source_format or "", source_format)
    return fmt if fmt in WRITES else FALLBACK_FORMAT


def kept_suffix(suffix: str) -> str:
    """The name ending ``keep`` gives a source named ``*suffix``: its own, or ``.png`` if written as PNG."""
    Image.init()
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None or output_format(fmt, "keep") == KEEP_AS.get(fmt, fmt):
        return suffix
    return ".png"


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info)


def flatten(im: Image.Image, background: str) -> Image.Image:
    """``im`` composited onto an opaque ``background`` colour, in RGB."""
    rgba = im.convert("RGBA")
    base = Image.new("RGB", rgba.size, ImageColor.getrgb(background)[:3])
    base.paste(rgba, mask=rgba.getchannel("A"))
    return base


def fit_mode(im: Image.Image, fmt: str, background: str, deep: bool = False) -> Image.Image:
    """``im`` in a mode ``fmt`` stores: depth, colour and alpha kept as far as ``fmt`` holds them.

    ``im`` is a working image from :func:`render` (L, LA, RGB, RGBA, I, F or
    CMYK); ``deep`` says it came from a 16-bit source.  Alpha is flattened onto
    ``background`` where ``fmt`` has none.
    """
    modes = WRITES.get(fmt, WRITES[FALLBACK_FORMAT])
    if im.mode in ("I", "F"):
        if im.mode == "I" and deep and "I;16" in modes:
            return im.convert("I;16")  # back to the 16 bits it came with
        if im.mode in modes:
            return im
        if im.mode == "I" and "I;16" in modes:
            return im.convert("I;16")
        if "F" in modes:
            return im.convert("F")
        # Into 8 bits: a 16-bit range scaled, anything else clipped.
        im = (im.point(lambda v: v * (1 / 256)) if deep else im).convert("L")
    if "F" in modes and im.mode not in modes:
        return im.convert("F")  # SPIDER stores floats only
    if im.mode == "CMYK" and "CMYK" not in modes:
        im = im.convert("RGB")
    if im.mode in ("LA", "RGBA") and im.mode not in modes:
        if im.mode == "LA" and "RGBA" in modes:
            return im.convert("RGBA")
        grey = im.mode == "LA"
        im = flatten(im, background)
        if grey:
            im = im.convert("L")
    if im.mode in modes:
        return im
    if im.mode == "L" and "RGB" in modes:
        return im.convert("RGB")
    if "L" in modes:
        return im.convert("L")
    if "1" in modes:
        return im.convert("L").convert("1")  # dithered, as Pillow does
    if "P" in modes:
        return im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return im.convert("RGB")


def _transparency_as_alpha(im: Image.Image) -> Image.Image:
    """``im`` with a tRNS-style transparent colour (``info["transparency"]``) turned into an alpha channel.

    Resampling blends neighbours, so a single transparent colour would not survive
    it; an alpha channel does.  16-bit grey goes to 8-bit grey with alpha: the
    transparency is what a viewer sees first.
    """
    key = im.info.get("transparency")
    if key is None or im.mode in ("P", "LA", "RGBA", "PA"):
        return im
    if im.mode.startswith("I"):
        wide = im.convert("I")
        alpha = ImageMath.lambda_eval(lambda args: (args["im"] != key) * 255, im=wide).convert("L")
        grey = wide.point(lambda v: v * (1 / 256)).convert("L")
        grey.putalpha(alpha)
        return grey
    if im.mode in ("1", "L"):
        return im.convert("LA")
    if im.mode == "RGB" and isinstance(key, tuple):
        return im.convert("RGBA")
    return im


def _working_mode(im: Image.Image) -> Image.Image:
    """``im`` in a mode Lanczos resamples well: L, LA, RGB, RGBA, I, F or CMYK."""
    im = _transparency_as_alpha(im)
    if im.mode.startswith("I;16"):
        # 16-bit greyscale cannot be resampled as it is; 32-bit integer can.
        return im.convert("I")
    if im.mode == "1":
        # A bilevel page shrinks to grey: resampled in two levels it would be noise.
        return im.convert("L")
    if im.mode in ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK"):
        return im
    # Palette (nearest pixels only, so work in full colour), PA, La, RGBa, RGBX, YCbCr, ...
    return im.convert("RGBA" if _has_alpha(im) or "A" in im.mode else "RGB")


def _colour_space(mode: str) -> str:
    if mode == "CMYK":
        return "CMYK"
    return "L" if Image.getmodebase(mode) == "L" else "RGB"


def save_params(
    fmt: str, out: Image.Image, source_info: dict[Any, Any], options: ResizeOptions
) -> dict[str, Any]:
    """Pillow's save parameters for ``out`` in ``fmt``: set here for the output, never carried over."""
    params: dict[str, Any] = {}
    if fmt in ("JPEG", "WEBP", "AVIF"):
        params["quality"] = options.quality
    elif fmt == "PNG":
        params["compress_level"] = 6
    elif fmt == "TIFF":
        compression = source_info.get("compression")
        fits = _TIFF_COMPRESSIONS.get(compression or "", frozenset())
        params["compression"] = compression if fits is None or out.mode in fits else _TIFF_DEFAULT
        if params["compression"] == "jpeg":
            params["quality"] = options.quality
    elif fmt == "TGA" and source_info.get("compression") == "tga_rle":
        params["compression"] = "tga_rle"
    elif fmt == "ICO":
        params["sizes"] = [out.size]  # its own size only, not Pillow's default ladder of squares
    return params


def _turned(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``size`` as shown once ``orientation`` (an EXIF value) is applied."""
    return (size[1], size[0]) if orientation in _TRANSPOSED else size


def _draft(im: Image.Image, box: tuple[int, int], options: ResizeOptions, orientation: int) -> None:
    """Let a JPEG decode at the smallest DCT scale still enough for ``box``; a no-op for other formats.

    JPEG's reader declares the stored size and leaves ``orientation`` for
    :func:`render` to apply: the size shown is the stored one turned by it.
    """
    stored = im.size
    shown = _turned(stored, orientation)
    target = output_size(shown, box, options.mode, options.upscale)
    # The scale each displayed axis needs; fit and fill keep the aspect, exact does not.
    sx, sy = target[0] / shown[0], target[1] / shown[1]
    if options.mode == "fill":
        sx = sy = max(sx, sy)
    need = _turned(
        (math.ceil(shown[0] * sx * _DRAFT_GAP), math.ceil(shown[1] * sy * _DRAFT_GAP)), orientation
    )
    if need[0] < stored[0] and need[1] < stored[1]:
        im.draft(None, need)  # DCT scaling to no less than ``need``


def render(im: Image.Image, box: tuple[int, int], options: ResizeOptions) -> Image.Image:
    """The resized image: EXIF orientation applied exactly once, then fit, fill or exact into ``box``.

    ``im`` is freshly opened (not yet loaded), so a JPEG can still be decoded at
    a reduced scale.
    """
    declared = im.size
    if declared[0] < 1 or declared[1] < 1:
        raise ValueError(f"it declares {declared[0]}x{declared[1]} pixels")
    _draft(im, box, options, im.getexif().get(0x0112, 1))
    im.load()
    # The orientation the reader left to us.  Pillow's TIFF reader (libtiff or its own
    # decoder) applies the tag as it loads and then deletes it (TiffImagePlugin.load_end:
    # ``ImageOps.exif_transpose(self, in_place=True)``), having declared the turned size
    # when opened (``_setup``); every other reader keeps the tag and the stored size.
    pending = im.getexif().get(0x0112, 1)
    target = output_size(_turned(declared, pending), box, options.mode, options.upscale)
    im = _working_mode(ImageOps.exif_transpose(im))
    if options.mode == "fill":
        return ImageOps.fit(im, target, Image.Resampling.LANCZOS, centering=ANCHORS[options.anchor])
    if im.size == target:
        return im
    return im.resize(target, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)


def resize_to(
    source: str,
    destination: str,
    box: tuple[int, int],
    options: ResizeOptions,
    seen: Callable[[Image.Image], object] | None = None,
) -> OutputRecord:
    """Resize the image at URL ``source`` into ``box`` and write it to URL ``destination``.

    ``seen`` is called with the output image once it is written.

    The output appears under its final name only once complete.  Raises
    :class:`ImageError` naming ``source`` for an input or output that cannot
    work, :class:`TransientError` for I/O worth another try.
    """
    if box[0] < 1 or box[1] < 1:
        raise ImageError(source, f"size must be positive, got {box[0]}x{box[1]}")
    started = time.perf_counter()
    try:
        opened = storage.open_source(source)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the item's error
        raise _io_error(source, exc, "read") from None
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A damaged EXIF block is read as no EXIF (orientation 1), not a failed image.
            warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
            with Image.open(opened) as im:
                if isinstance(im, ImageFile.StubImageFile):
                    im.load()  # BUFR, GRIB, HDF5, WMF: raises naming the handler it lacks
                fmt = output_format(im.format, options.format)
                source_info = dict(im.info)
                source_mode = im.mode
                out = fit_mode(
                    render(im, box, options), fmt, options.background, deep=source_mode.startswith("I;16")
                )
                if fmt == "ICO" and max(out.size) > ICO_MAX:
                    out.thumbnail((ICO_MAX, ICO_MAX), Image.Resampling.LANCZOS)
                # Nothing of the source's info reaches the encoder: Pillow's savers read
                # compression, transparency, palette and more from it (Group 4 on greyscale,
                # an int tRNS on RGB).  What the output keeps is passed explicitly below.
                out.info = {}
    except FileNotFoundError:
        raise ImageError(source, "no such file") from None
    except IsADirectoryError:
        raise ImageError(source, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(source, "not an image Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(source, f"refused as a decompression bomb: {exc}") from None
    except OSError as exc:
        # A local read that hiccuped may pass again; anything else Pillow raises is the file's fault.
        if exc.errno in _TRANSIENT_ERRNOS:
            raise TransientError(f"{source}: {exc}") from exc
        if "Ghostscript" in str(exc):
            raise ImageError(source, "cannot decode EPS: Pillow needs Ghostscript (gs) installed") from None
        raise ImageError(source, f"cannot decode: {exc}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError(source, f"corrupt image: {exc.__class__.__name__}: {exc}") from None

    params = save_params(fmt, out, source_info, options)
    icc = source_info.get("icc_profile")
    if icc and _colour_space(out.mode) == _colour_space(source_mode):
        params["icc_profile"] = icc  # the only metadata kept: without it colours shift

    def write(fh: IO[bytes]) -> None:
        # Encoded in memory first: an encoder that refuses the image is the image's
        # error, never a transient write failure worth a retry.
        encoded = io.BytesIO()
        try:
            out.save(encoded, format=fmt, **params)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageError(source, f"cannot encode as {fmt} ({out.mode}): {exc}") from None
        fh.write(encoded.getbuffer())

    try:
        size = storage.write_atomic(destination, write)
    except (ImageError, TransientError):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes the item's error
        raise _io_error(source, exc, f"write {destination}") from None
    record: OutputRecord = {
        "source": source,
        "destination": destination,
        "box": [box[0], box[1]],
        "width": out.width,
        "height": out.height,
        "format": fmt,
        "bytes": size,
        "seconds": 0.0,
    }
    if seen is not None:
        try:
            seen(out)
        except Exception:  # a missing tile is read back from the output instead
            log.warning("could not make the contact-sheet tile of %s", destination, exc_info=True)
    record["seconds"] = round(time.perf_counter() - started, 4)
    return record


def _io_error(source: str, exc: BaseException, doing: str) -> ImageError | TransientError:
    """A read or write failure as the item's error: transient when another try may pass."""
    if isinstance(exc, (ImageError, TransientError)):
        return exc
    if isinstance(exc, ConfigError):
        return ImageError(source, str(exc))
    if isinstance(exc, FileNotFoundError):
        return ImageError(source, f"cannot {doing}: no such file or object")
    if isinstance(exc, IsADirectoryError):
        return ImageError(source, "is a directory, not an image")
    if isinstance(exc, PermissionError):
        return ImageError(source, f"cannot {doing}: permission denied")
    text = f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, ConnectionError | TimeoutError):
        # A reset, refused or timed-out connection to a store: sockets raise these with an
        # errno (ECONNRESET...), which the errno test below would take for the file's fault.
        return TransientError(f"{source}: cannot {doing}: {text}")
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno not in _TRANSIENT_ERRNOS:
        return ImageError(source, f"cannot {doing}: {text}")
    if isinstance(exc, (ValueError, TypeError)) or "Credentials" in exc.__class__.__name__:
        return ImageError(source, f"cannot {doing}: {text}")
    # Network and store errors (timeouts, 5xx, connection resets) may pass on a retry.
    return TransientError(f"{source}: cannot {doing}: {text}")
