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

The EXIF orientation is applied; the ICC colour profile is kept; all other
metadata (EXIF, XMP, text chunks) is dropped.  Alpha is flattened onto
``background`` when the output format (JPEG) has none.  JPEG sources are
decoded at a reduced scale (``draft``) when the box is much smaller, and
Pillow's decompression-bomb limit stays on.
"""

from __future__ import annotations

import errno
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import IO, Any, TypedDict

from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from workers import storage
from workers.errors import ConfigError, ImageError, TransientError

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
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1..100, got {self.quality}")
        ImageColor.getrgb(self.background)  # raises ValueError for a colour Pillow does not know

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
    """The Pillow format written for ``choice`` (``keep``: the source's, PNG if it has none)."""
    return FORMATS[choice] or source_format or "PNG"


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info)


def flatten(im: Image.Image, background: str) -> Image.Image:
    """``im`` composited onto an opaque ``background`` colour, in RGB."""
    rgba = im.convert("RGBA")
    base = Image.new("RGB", rgba.size, ImageColor.getrgb(background)[:3])
    base.paste(rgba, mask=rgba.getchannel("A"))
    return base


def _for_format(im: Image.Image, fmt: str, background: str) -> Image.Image:
    """``im`` in a mode ``fmt`` can store, alpha flattened where the format has none."""
    if im.mode == "I":
        if fmt == "PNG":
            return im.convert("I;16")  # back to the 16 bits it came with
        im = im.point(lambda v: v * (1 / 256)).convert("L")  # 16-bit range into 8 bits
    if fmt == "JPEG":
        if _has_alpha(im):
            return flatten(im, background)
        return im if im.mode in ("RGB", "L", "CMYK") else im.convert("RGB")
    if fmt == "WEBP" and im.mode not in ("RGB", "RGBA"):
        return im.convert("RGBA" if _has_alpha(im) else "RGB")
    if fmt == "PNG" and im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    return im


def render(im: Image.Image, box: tuple[int, int], options: ResizeOptions) -> Image.Image:
    """The resized image: EXIF orientation applied, then fit, fill or exact into ``box``.

    ``im`` is freshly opened (not yet loaded), so a JPEG can still be decoded at
    a reduced scale.
    """
    orientation = im.getexif().get(0x0112, 1)
    stored_w, stored_h = im.size
    shown = (stored_h, stored_w) if orientation in _TRANSPOSED else (stored_w, stored_h)
    target = output_size(shown, box, options.mode, options.upscale)
    # The scale each displayed axis needs; fit and fill keep the aspect, exact does not.
    sx, sy = target[0] / shown[0], target[1] / shown[1]
    if options.mode == "fill":
        sx = sy = max(sx, sy)
    need = (math.ceil(shown[0] * sx * _DRAFT_GAP), math.ceil(shown[1] * sy * _DRAFT_GAP))
    if orientation in _TRANSPOSED:
        need = (need[1], need[0])
    if need[0] < stored_w and need[1] < stored_h:
        im.draft(None, need)  # JPEG only: DCT scaling to no less than ``need``; a no-op elsewhere
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        # 16-bit greyscale cannot be resampled as it is; 32-bit integer can
        # (a PNG is written back as 16-bit, see _for_format).
        im = im.convert("I")
    if im.mode in ("P", "1"):
        # Resampling a palette picks nearest pixels; work in full colour instead.
        im = im.convert("RGBA" if _has_alpha(im) else "RGB")
    if options.mode == "fill":
        return ImageOps.fit(im, target, Image.Resampling.LANCZOS, centering=ANCHORS[options.anchor])
    if im.size == target:
        return im
    return im.resize(target, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)


def resize_to(source: str, destination: str, box: tuple[int, int], options: ResizeOptions) -> OutputRecord:
    """Resize the image at URL ``source`` into ``box`` and write it to URL ``destination``.

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
                fmt = output_format(im.format, options.format)
                icc = im.info.get("icc_profile")
                out = _for_format(render(im, box, options), fmt, options.background)
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
        raise ImageError(source, f"cannot decode: {exc}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError(source, f"corrupt image: {exc.__class__.__name__}: {exc}") from None

    params: dict[str, Any] = {}
    if icc:
        params["icc_profile"] = icc  # the only metadata kept: without it colours shift
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = options.quality
    if fmt == "PNG":
        params["compress_level"] = 6

    def write(fh: IO[bytes]) -> None:
        out.save(fh, format=fmt, **params)

    try:
        size = storage.write_atomic(destination, write)
    except (ImageError, TransientError):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes the item's error
        raise _io_error(source, exc, f"write {destination}") from None
    return {
        "source": source,
        "destination": destination,
        "box": [box[0], box[1]],
        "width": out.width,
        "height": out.height,
        "format": fmt,
        "bytes": size,
        "seconds": round(time.perf_counter() - started, 4),
    }


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
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno not in _TRANSIENT_ERRNOS:
        return ImageError(source, f"cannot {doing}: {text}")
    if isinstance(exc, (ValueError, TypeError)) or "Credentials" in exc.__class__.__name__:
        return ImageError(source, f"cannot {doing}: {text}")
    # Network and store errors (timeouts, 5xx, connection resets) may pass on a retry.
    return TransientError(f"{source}: cannot {doing}: {text}")
