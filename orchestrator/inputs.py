"""Turning command-line input into work items, before anything is sent."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import storage
from workers.core import FanoutTask
from workers.errors import ConfigError, InfrastructureError, InputError
from workers.imaging import IMAGE_SUFFIXES
from workers.resizing import FORMATS, SUFFIXES, kept_suffix


def parse_number(token: str, position: int) -> int:
    """``token`` as an integer, or InputError naming it and its position (1-based)."""
    text = token.strip()
    try:
        if not text or text.startswith("_") or "__" in text:
            raise ValueError
        return int(text, 10)
    except ValueError:
        raise InputError(f"argument {position} ({token!r}) is not an integer") from None


def parse_numbers(tokens: Iterable[str]) -> list[int]:
    return [parse_number(token, position) for position, token in enumerate(tokens, 1)]


@dataclass(frozen=True)
class ImagePlan:
    """What ``fanout resize`` will send: (source, destination) pairs, absolute paths or URLs."""

    pairs: list[tuple[str, str]]
    skipped: list[str]  # non-image files found in directories


def _unique(dst: str, taken: set[str]) -> str:
    candidate, n = dst, 1
    stem, suffix = posixpath.splitext(dst)
    while candidate in taken:
        n += 1
        candidate = f"{stem}~{n}{suffix}"
    taken.add(candidate)
    return candidate


def _basename(url: str) -> str:
    return Path(url).name if storage.is_local(url) else posixpath.basename(url)


def plan_images(sources: Sequence[str | Path], out_dir: str | Path) -> ImagePlan:
    """Expand files, directories and object-store prefixes into (source, destination) pairs.

    Sources and ``out_dir`` are local paths, ``file://`` or ``s3://`` URLs
    (see :mod:`workers.storage`); local ones become absolute paths.  A
    directory or prefix is walked recursively in sorted order (symlinked
    directories are not followed) and its layout kept under ``out_dir``; files
    in it that are not images by their suffix are skipped and counted.  A file
    named directly is sent as it is.  Two inputs that would land on one output
    name get distinct names.  ``out_dir`` itself is never walked.
    """
    out = storage.normalize(out_dir)
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    taken: set[str] = set()
    for raw in sources:
        src = storage.normalize(raw)
        try:
            if storage.is_file(src):
                pairs.append((src, _unique(storage.join(out, _basename(src)), taken)))
                continue
            if not storage.exists(src):
                raise InputError(f"{str(raw)!r}: no such file or directory")
            found = storage.list_files(src, exclude=out)
        except (InputError, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - a store that cannot be listed stops the run
            raise InfrastructureError(f"cannot list {str(raw)!r}: {exc.__class__.__name__}: {exc}") from None
        for path in found:
            local = storage.is_local(path)
            if posixpath.splitext(path)[1].lower() not in IMAGE_SUFFIXES or (
                local and not Path(path).is_file()
            ):
                skipped.append(path)
                continue
            pairs.append((path, _unique(storage.join(out, storage.relative_to(path, src)), taken)))
    return ImagePlan(pairs=pairs, skipped=skipped)


def parse_size(text: str) -> tuple[int, int]:
    """``N`` (a box N x N) or ``WxH``, as (width, height); InputError if neither."""
    parts = text.lower().strip().split("x")
    try:
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            raise ValueError
        width, height = int(parts[0]), int(parts[-1])
    except ValueError:
        raise InputError(f"size {text!r} is neither N nor WxH (whole numbers of pixels)") from None
    if width < 1 or height < 1:
        raise InputError(f"size {text!r} must be at least 1x1")
    return width, height


def size_label(size: tuple[int, int]) -> str:
    """``256`` for a square box, ``800x600`` otherwise: the tag in output names."""
    width, height = size
    return str(width) if width == height else f"{width}x{height}"


def plan_outputs(
    pairs: Sequence[tuple[str, str]], sizes: Sequence[tuple[int, int]], fmt: str = "keep"
) -> list[tuple[str, str, int, int]]:
    """One (source, destination, width, height) item per (image, size), image-major.

    With several sizes each output name gains ``-<size>`` (``a-1024.jpg``,
    ``a-256.jpg``); with ``fmt`` other than ``keep`` the suffix follows the
    format (``a.webp``), as it does for ``keep`` where the source's format is
    written as PNG (``a.psd`` -> ``a.png``).  Names that would still collide get distinct ones.
    """
    if not sizes:
        raise InputError("give at least one size (--size or --max-side)")
    suffix = SUFFIXES.get(FORMATS.get(fmt) or "", "")
    items: list[tuple[str, str, int, int]] = []
    taken: set[str] = set()
    for source, destination in pairs:
        stem, ext = posixpath.splitext(destination)
        ext = suffix or kept_suffix(ext)  # keep: the source's, unless it is written as PNG
        for size in sizes:
            tag = f"-{size_label(size)}" if len(sizes) > 1 else ""
            items.append((source, _unique(f"{stem}{tag}{ext}", taken), size[0], size[1]))
    return items


def parse_json_object(text: str, option: str) -> dict[str, Any]:
    """``text`` as a JSON object, or InputError naming ``option``."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object, got {type(value).__name__}")
    return value


def load_task(spec: str, what: str) -> FanoutTask[Any, Any]:
    """The ``@fanout.task`` named ``module:function``, imported as ``celery -A`` would (from here)."""
    import importlib
    import os
    import sys

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"{what} {spec!r}: expected MODULE:FUNCTION, e.g. myjobs:score")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{what} {spec!r}: cannot import {module_name}: {exc}") from None
    found = getattr(module, attribute, None)
    for part in attribute.split(".")[1:] if found is None else ():
        found = getattr(found, part, None)
    if found is None:
        raise InputError(f"{what} {spec!r}: {module_name} has no {attribute}")
    if not isinstance(found, FanoutTask):
        raise InputError(f"{what} {spec!r} is not a fanout task: decorate it with @fanout.task")
    return found
