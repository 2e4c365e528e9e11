"""Turning command-line input into work items, before anything is sent."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.imaging import IMAGE_SUFFIXES


class InputError(ValueError):
    """Command-line input that cannot become work items; the message names the culprit."""


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
    """What ``fanout resize`` will send: (source, destination) pairs, both absolute."""

    pairs: list[tuple[str, str]]
    skipped: list[str]  # non-image files found in directories


def _unique(dst: Path, taken: set[Path]) -> Path:
    candidate, n = dst, 1
    while candidate in taken:
        n += 1
        candidate = dst.with_name(f"{dst.stem}~{n}{dst.suffix}")
    taken.add(candidate)
    return candidate


def plan_images(sources: Sequence[str | Path], out_dir: str | Path) -> ImagePlan:
    """Expand files and directories into (source, destination) pairs.

    A directory is walked recursively in sorted order (symlinked directories
    are not followed) and its layout kept under ``out_dir``; files in it that
    are not images by their suffix are skipped and counted.  A file named
    directly is sent as it is.  Two inputs that would land on one output name
    get distinct names.  ``out_dir`` itself is never walked.
    """
    out = Path(out_dir).resolve()
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    taken: set[Path] = set()
    for raw in sources:
        src = Path(raw)
        if not src.exists():
            raise InputError(f"{str(raw)!r}: no such file or directory")
        src = src.resolve()
        if src.is_file():
            pairs.append((str(src), str(_unique(out / src.name, taken))))
            continue
        for root, dirs, files in os.walk(src):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if (here / d).resolve() != out)
            for name in sorted(files):
                path = here / name
                if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                    skipped.append(str(path))
                    continue
                pairs.append((str(path), str(_unique(out / path.relative_to(src), taken))))
    return ImagePlan(pairs=pairs, skipped=skipped)
