"""Reading and writing objects by URL through fsspec: local paths, ``file://`` and ``s3://``.

Workers on other machines share no disk with the orchestrator, so sources and
destinations travel as URLs and each side opens them itself.  Local paths stay
plain paths (absolute, so they mean the same on every worker of one host or a
shared volume); ``s3://`` goes through s3fs, an optional extra
(``pip install 'fanout[s3]'``) that talks to AWS S3 or any S3-compatible store.

Credentials and the endpoint come from the environment the standard way
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO/Ceph), read by each process; they never
appear in a task message.

Writes are atomic from a reader's point of view: a local file is written under
a temporary name in its directory and renamed; an object is sent in a single
PUT, which a store makes visible whole or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from workers.errors import ConfigError

#: Schemes served by the local disk.
LOCAL_SCHEMES = frozenset({"", "file"})


def scheme(url: str | Path) -> str:
    """The URL's scheme, lower case; ``""`` for a plain path."""
    text = str(url)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def is_local(url: str | Path) -> bool:
    return scheme(url) in LOCAL_SCHEMES


def normalize(url: str | Path) -> str:
    """A local path or ``file://`` URL as an absolute path; any other URL unchanged (less a trailing /)."""
    text = str(url)
    kind = scheme(text)
    if kind == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{text!r}: a file:// URL names a path on this host, not {parts.netloc!r}")
        return str(Path(unquote(parts.path)).resolve())
    if kind == "":
        return str(Path(text).expanduser().resolve())
    return text.rstrip("/") if text.rstrip("/") != f"{kind}:/" else text


def join(base: str, relative: str) -> str:
    """``relative`` (a /-separated path) under ``base``, a normalized path or URL."""
    if is_local(base):
        return str(Path(base, *relative.split("/")))
    return posixpath.join(base, relative)


def relative_to(url: str, base: str) -> str:
    """``url`` relative to ``base`` (both normalized), /-separated."""
    if is_local(base):
        return Path(url).relative_to(base).as_posix()
    return posixpath.relpath(_path_of(url), _path_of(base))


def _path_of(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def _storage_options(kind: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """fsspec options for ``kind`` taken from the environment (never from a message)."""
    env = os.environ if env is None else env
    if kind in ("s3", "s3a"):
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path within it.

    fsspec caches instances by their options, so each process builds one per
    store and reuses it.
    """
    import fsspec

    kind = scheme(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **_storage_options(kind))
    except ImportError as exc:
        raise ConfigError(
            f"{url!r}: {kind}:// needs an extra package ({exc}); for s3:// install 'fanout[s3]'"
        ) from None
    except ValueError as exc:  # an unknown protocol
        raise ConfigError(f"{url!r}: {exc}") from None
    return fs, path


def read_bytes(url: str) -> bytes:
    """The whole object or file at ``url``."""
    if is_local(url):
        return Path(url).read_bytes()
    fs, path = filesystem(url)
    return bytes(fs.cat_file(path))


def open_source(url: str) -> str | IO[bytes]:
    """Something ``PIL.Image.open`` takes: the path itself when local, else the object's bytes."""
    return url if is_local(url) else io.BytesIO(read_bytes(url))


def write_atomic(url: str, write: Callable[[IO[bytes]], object]) -> int:
    """Call ``write`` with a binary stream whose content appears at ``url`` whole; return its size.

    Local: a temporary file beside the target, then ``os.replace``.  Object
    stores: the bytes are gathered in memory and sent in one PUT.
    """
    if is_local(url):
        target = Path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            # mkstemp creates 0600; give the output the mode a plain open() would, for other readers.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target.stat().st_size
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getvalue()
    fs, path = filesystem(url)
    fs.pipe_file(path, data)
    return len(data)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def exists(url: str) -> bool:
    if is_local(url):
        return Path(url).exists()
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def is_file(url: str) -> bool:
    if is_local(url):
        return Path(url).is_file()
    fs, path = filesystem(url)
    return bool(fs.isfile(path))


def list_files(url: str, exclude: str | None = None) -> list[str]:
    """Every file under the directory or prefix ``url``, recursively, in sorted order, as URLs.

    Anything under ``exclude`` (the output location) is left out; symlinked
    directories are not followed.
    """
    if is_local(url):
        found: list[str] = []
        for root, dirs, files in os.walk(url):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if exclude is None or str((here / d).resolve()) != exclude)
            found.extend(str(here / name) for name in sorted(files))
        return found
    fs, path = filesystem(url)
    protocol = scheme(url)
    keys = sorted(str(k) for k in fs.find(path.rstrip("/") + "/", withdirs=False))
    urls = [f"{protocol}://{k}" for k in keys]
    if exclude is not None:
        urls = [u for u in urls if not (u == exclude or u.startswith(exclude.rstrip("/") + "/"))]
    return urls


def remove_many(urls: list[str]) -> None:
    """Delete the files or objects at ``urls``; ones already gone are fine.

    Objects go in bulk requests (S3 deletes up to 1,000 keys per request).
    """
    local = [u for u in urls if is_local(u)]
    for url in local:
        Path(url).unlink(missing_ok=True)
    remote: dict[str, list[str]] = {}
    for url in urls:
        if not is_local(url):
            remote.setdefault(scheme(url), []).append(url)
    for group in remote.values():
        fs, _ = filesystem(group[0])
        paths = [filesystem(u)[1] for u in group]
        with contextlib.suppress(FileNotFoundError):
            fs.rm(paths)
