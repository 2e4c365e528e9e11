"""Keeping outputs inside the output directory, whatever a message or the file system says."""

from __future__ import annotations

from pathlib import Path

from workers.errors import ImageError


def inside(destination: str | Path, root: str | Path, item: str) -> Path:
    """``destination`` if it lands inside ``root``, else :class:`ImageError` naming ``item``.

    ``..`` components, absolute paths elsewhere, and symlinked directories on
    the way that point out of ``root`` are all refused.  The final name itself
    may be an existing symlink: outputs are written by renaming over it, which
    replaces the link, never its target.
    """
    dst = Path(destination)
    base = Path(root).resolve()
    if dst.name in ("", ".", ".."):
        raise ImageError(item, f"output name {str(destination)!r} is not a file name")
    parent = (dst.parent if dst.is_absolute() else base / dst.parent).resolve()
    if not parent.is_relative_to(base):
        raise ImageError(item, f"output {str(destination)!r} would land outside the output directory {base}")
    return parent / dst.name


def inside_url(destination: str, root: str, item: str) -> str:
    """``destination`` (a path or URL) if it lands inside ``root``, else :class:`ImageError`.

    Local paths get :func:`inside`'s checks (symlinks included); an object-store
    URL must name a key under ``root`` with no ``.`` or ``..`` segments.
    """
    from workers import storage

    if storage.is_local(root):
        if not storage.is_local(destination):
            raise ImageError(item, f"output {destination!r} is not under the output directory {root}")
        return str(inside(storage.normalize(destination), storage.normalize(root), item))
    base = storage.normalize(root).rstrip("/") + "/"
    rest = destination[len(base) :] if destination.startswith(base) else None
    if not rest or any(part in ("", ".", "..") for part in rest.split("/")):
        raise ImageError(item, f"output {destination!r} would land outside the output location {root}")
    return destination
