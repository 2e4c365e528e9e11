"""Sample photos for the demo and the tests: generated, so nothing is downloaded."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

#: The spread of the sensor-like noise in a noisy photo (Gaussian, per channel, out of 255).
NOISE_SIGMA = 24


def make_photo(
    path: Path,
    size: tuple[int, int] = (1920, 1080),
    seed: int = 0,
    orientation: int | None = None,
    quality: int = 90,
    noisy: bool = False,
) -> Path:
    """Write a photo-like JPEG (gradient sky, hills, sun) to ``path``.

    ``orientation`` sets the EXIF Orientation tag (1-8).  ``noisy`` adds
    per-channel noise, as a high-ISO photo has: a file several times larger,
    whose decoding dominates a resize.
    """
    rng = random.Random(seed)
    width, height = size
    top = tuple(rng.randrange(60, 200) for _ in range(3))
    bottom = tuple(rng.randrange(0, 120) for _ in range(3))
    sky = Image.linear_gradient("L").resize(size)
    im = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), sky)
    draw = ImageDraw.Draw(im)
    r = rng.randrange(height // 10, height // 4)
    cx, cy = rng.randrange(r, width - r), rng.randrange(r, height // 2)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, rng.randrange(150, 250), 60))
    for layer in range(3):
        base = height * (0.55 + 0.12 * layer)
        points: list[tuple[float, float]] = [(0, height)]
        for x in range(0, width + 1, max(1, width // 12)):
            points.append((x, base + rng.uniform(-0.08, 0.08) * height))
        points.append((width, height))
        shade = 40 + 40 * layer
        draw.polygon(points, fill=(shade // 2, shade, shade // 3))
    if noisy:
        im = ImageChops.add(im, _noise(size, seed % 4), offset=-128)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return path


@functools.lru_cache(maxsize=4)
def _noise(size: tuple[int, int], variant: int) -> Image.Image:
    """Gaussian noise around 128 in each channel (a few variants: generating it is slow)."""
    return Image.merge("RGB", [Image.effect_noise(size, NOISE_SIGMA) for _ in range(3)])


def make_photos(
    directory: Path, count: int, size: tuple[int, int] = (1920, 1080), noisy: bool = False
) -> list[Path]:
    """``count`` photos named ``photo-000.jpg``...; every fifth is portrait via EXIF rotation."""
    return [
        make_photo(
            directory / f"photo-{i:03d}.jpg", size, seed=i, orientation=6 if i % 5 == 4 else None, noisy=noisy
        )
        for i in range(count)
    ]
