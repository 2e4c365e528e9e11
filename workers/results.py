"""Results by reference: a big job's parts and outcome live in a results location, not in Redis.

Past a size (``FANOUT_BY_REFERENCE_ITEMS``) a job is sent *by reference*:

* its header tasks write their part (results and errors of one batch) to
  ``<job dir>/parts/`` and return a :class:`PartRef` of a few hundred bytes
  through the chord's join;
* the callback merges the references, not the values (:func:`merge_refs`):
  each index is checked once, by interval (a batch delivered twice wrote two
  files; one of them counts), the errors are streamed to ``errors.jsonl`` and
  the order of the parts to ``outcome.json``;
* Redis keeps only the job's state, its counts and ``ref``, the job directory;
* readers stream the results in input order, one part in memory at a time
  (:func:`iter_items`).

The job directory is a local path or an fsspec URL (``s3://``), the same for
the client and every worker; it is removed once it is older than the job's
results (:func:`sweep`).  Nothing here knows about Celery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NotRequired, TypedDict, TypeVar

from workers import storage
from workers.errors import ConfigError, InfrastructureError
from workers.fanin import ItemFailure, OutcomeDoc, Part, flatten

#: A part carries its errors in its reference when it has at most this many
#: (the callback then never opens its file); more stay in the file alone.
INLINE_ERRORS = 32
PARTS = "parts"
INPUTS = "inputs"
OUTCOME = "outcome.json"
ERRORS = "errors.jsonl"
LOST = "lost: no worker reported this item"
#: Tries of one read or write on an object store (0.5 s, 1 s, 2 s apart).
IO_ATTEMPTS = 4

logger = logging.getLogger(__name__)
T = TypeVar("T")


class PartRef(TypedDict):
    """What a header task returns for a job sent by reference: where its part is, and its counts."""

    start: int
    count: int
    url: str
    failed: int
    errors: NotRequired[list[ItemFailure]]  # when at most INLINE_ERRORS


def job_dir(root: str, job_id: str) -> str:
    """The directory (or prefix) of one job under the results location ``root``."""
    return storage.join(storage.normalize(root), job_id)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def retrying_io(url: str, operation: Callable[[], T]) -> T:
    """``operation`` on ``url``, tried again on an object store's passing errors (a few seconds in all).

    A local file's errors (no space, no permission, no such file) do not pass with
    time, and an object that is not there is not there: those are raised at once.
    """
    pause = 0.5
    for attempt in range(1, IO_ATTEMPTS + 1):
        try:
            return operation()
        except FileNotFoundError:
            raise
        except Exception as exc:
            if storage.is_local(url) or attempt == IO_ATTEMPTS:
                raise
            logger.warning("%s: %s; trying again in %.1f s", url, exc, pause)
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def write_json(url: str, value: Any) -> int:
    return write_bytes(url, _dumps(value))


def write_bytes(url: str, data: bytes) -> int:
    return retrying_io(url, lambda: storage.write_atomic(url, lambda fh: fh.write(data)))


def read_json(url: str) -> Any:
    return json.loads(retrying_io(url, lambda: storage.read_bytes(url)))


def failure_run(start: int, count: int, reason: str) -> ItemFailure:
    """Items ``start`` .. ``start + count - 1``, every one failed for ``reason``, as one entry.

    How a purge reports the batches of a stopped job sent by reference: one line
    however many items, where one per item would make the fan-in of a job of
    millions of items cancelled run past its time limit.  Readers see one
    failure per item (:func:`iter_errors`), with no input (the inputs stay in
    their files: ``fanout retry`` reads them there).
    """
    return {"index": start, "input": None, "error": reason, "count": count}


def _failed(entry: ItemFailure) -> int:
    """How many items an error entry stands for: one, or a :func:`failure_run`'s count."""
    return entry.get("count", 1)


def _clipped(entry: ItemFailure, low: int, high: int) -> ItemFailure | None:
    """The part of ``entry`` within indexes ``low`` .. ``high - 1``, or None if none is."""
    first, count = int(entry["index"]), _failed(entry)
    lo, hi = max(first, low), min(first + count, high)
    if lo >= hi:
        return None
    if "count" not in entry:
        return entry
    return failure_run(lo, hi - lo, str(entry["error"]))


def _items(entry: ItemFailure) -> Iterator[ItemFailure]:
    """One failure per item of an error entry."""
    if "count" not in entry:
        yield entry
        return
    first, reason = int(entry["index"]), entry["error"]
    for index in range(first, first + _failed(entry)):
        yield {"index": index, "input": None, "error": reason}


def write_part(where: str, part: Part) -> PartRef:
    """Write ``part`` under job directory ``where`` and return its reference.

    Each run writes a file of its own: a batch delivered twice leaves two
    complete files, and the callback takes one of them, whole.
    """
    url = storage.join(where, f"{PARTS}/{part['start']:012d}-{uuid.uuid4().hex[:12]}.json")
    write_json(url, part)
    ref: PartRef = {
        "start": part["start"],
        "count": part.get("count", len(part["results"])),
        "url": url,
        "failed": sum(_failed(e) for e in part["errors"]),
    }
    if len(part["errors"]) <= INLINE_ERRORS:
        ref["errors"] = part["errors"]
    return ref


def read_part(url: str) -> Part:
    part: Part = read_json(url)
    return part


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and "url" in value and "count" in value


def input_url(where: str, start: int) -> str:
    """Where the client writes the items of the batch starting at ``start``."""
    return storage.join(where, f"{INPUTS}/{start:012d}.json")


def chunk_url(where: str, number: int) -> str:
    """Where a streamed job's input chunk ``number`` is kept: its items ``number * chunk`` onwards,
    ``chunk`` of them (the job's ``JobSpec.chunk``), as one JSON list."""
    return storage.join(where, f"{INPUTS}/chunk-{number:09d}.json")


#: The input chunk this process read last (its URL and items): small batches of one chunk,
#: taken one after another, read it once.  A chunk never changes once written.
_last_chunk: tuple[str, list[Any]] = ("", [])


def read_slice(where: str, start: int, stop: int, chunk: int) -> list[Any]:
    """Items ``start`` .. ``stop - 1`` of a streamed job, read from the chunks that hold them."""
    global _last_chunk
    items: list[Any] = []
    for number in range(start // chunk, (stop - 1) // chunk + 1):
        first, url = number * chunk, chunk_url(where, number)
        held = _last_chunk[1] if _last_chunk[0] == url else read_json(url)
        _last_chunk = (url, held)
        items.extend(held[max(start, first) - first : min(stop, first + len(held)) - first])
    return items


def check_writable(root: str) -> None:
    """ConfigError, naming ``root``, unless a file can be written there and removed again."""
    probe = storage.join(storage.normalize(root), f".probe-{uuid.uuid4().hex[:12]}")
    try:
        write_json(probe, "probe")
        remove(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable as a results location"
        raise ConfigError(
            f"the results location {root} is not writable ({exc.__class__.__name__}: {exc}); "
            "set FANOUT_RESULTS_URL to a directory or URL that every worker and this client can write"
        ) from None


def remove(url: str) -> None:
    if storage.is_local(url):
        Path(url).unlink(missing_ok=True)
        return
    fs, path = storage.filesystem(url)
    fs.rm_file(path)


def remove_tree(url: str) -> None:
    if storage.is_local(url):
        import shutil

        shutil.rmtree(url, ignore_errors=True)
        return
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sweep(root: str, expires: float, now: float | None = None) -> int:
    """Remove the job directories under ``root`` older than ``expires`` seconds; return how many.

    Results expire with the job's record in Redis.  A local directory is
    swept by age (its modification time); on an object store a lifecycle rule
    on the prefix does the same job better, and this only removes what it lists.
    """
    now = time.time() if now is None else now
    removed = 0
    if storage.is_local(root):
        base = Path(root)
        if not base.is_dir():
            return 0
        for entry in base.iterdir():
            try:
                if entry.is_dir() and now - entry.stat().st_mtime > expires:
                    remove_tree(str(entry))
                    removed += 1
            except OSError:
                continue
        return removed
    fs, path = storage.filesystem(root)
    for info in fs.ls(path, detail=True):
        modified = info.get("LastModified") or info.get("mtime")
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else modified
        if info.get("type") == "directory" and isinstance(stamp, int | float) and now - stamp > expires:
            fs.rm(info["name"], recursive=True)
            removed += 1
    return removed


def _part_errors(ref: PartRef) -> list[ItemFailure]:
    if "errors" in ref:
        return ref["errors"]
    return read_part(ref["url"])["errors"]


def merge_refs(refs: Iterable[PartRef | None], total: int, job_id: str, task: str, where: str) -> OutcomeDoc:
    """Merge part references into an outcome kept under ``where``; return its small Redis form.

    Each index counts once: the references are ordered by their first index,
    a second reference for the same batch (a redelivery) is dropped (its file
    removed), and an index no reference covers is an error (lost).  The errors
    are written to ``errors.jsonl`` in index order as they are found, the
    parts' order to ``outcome.json``; the memory used is that of the
    references (one per batch), never of the values.
    """
    chosen: list[PartRef] = []
    dropped: list[str] = []
    # A cancel reports the batches it took off the queue as one part holding their references.
    flat: Iterable[Any] = flatten(refs)  # type: ignore[arg-type]
    for ref in sorted(flat, key=lambda r: r["start"]):
        if chosen and chosen[-1]["start"] == ref["start"]:
            dropped.append(ref["url"])
            continue
        chosen.append(ref)
    parts: list[list[Any]] = []  # [start, count, url, first index taken from it]
    failed = 0
    errors_url = storage.join(where, ERRORS)

    def write_errors(fh: IO[bytes]) -> None:
        nonlocal failed
        expected = 0

        def lost(until: int) -> None:
            nonlocal failed
            for index in range(expected, until):
                fh.write(_dumps({"index": index, "input": None, "error": LOST}) + b"\n")
                failed += 1

        for ref in chosen:
            start, count = ref["start"], ref["count"]
            end = min(start + count, total)
            if end <= expected or start >= total:
                dropped.append(ref["url"])  # wholly covered by an earlier part: counted once, there
                continue
            if start > expected:
                lost(start)
                expected = start
            parts.append([start, count, ref["url"], expected])
            if ref["failed"]:
                for entry in _part_errors(ref):
                    failure = _clipped(entry, expected, end)
                    if failure is not None:
                        fh.write(_dumps(failure) + b"\n")
                        failed += _failed(failure)
            expected = end
        lost(total)

    storage.write_atomic(errors_url, write_errors)
    outcome: OutcomeDoc = {
        "job_id": job_id,
        "task": task,
        "total": total,
        "succeeded": total - failed,
        "failed": failed,
        "results": [],
        "errors": [],
        "ref": where,
    }
    write_json(storage.join(where, OUTCOME), {**outcome, "parts": parts})
    for url in dropped:
        with contextlib.suppress(Exception):  # a stray file is swept with the job
            remove(url)
    return outcome


def keep(outcome: OutcomeDoc, where: str) -> OutcomeDoc:
    """An outcome held in memory written under ``where`` (one part); return its small Redis form."""
    part: Part = {"start": 0, "results": outcome["results"], "errors": outcome["errors"], "transient": 0}
    kept = merge_refs([write_part(where, part)], outcome["total"], outcome["job_id"], outcome["task"], where)
    extra = {k: v for k, v in outcome.items() if k not in kept and k not in ("results", "errors")}
    return {**kept, **extra}  # type: ignore[typeddict-item]


def merge_retry_refs(
    previous: OutcomeDoc, again: OutcomeDoc, indexes: Iterable[int], job_id: str, where: str
) -> OutcomeDoc:
    """:func:`~workers.fanin.merge_retry` for outcomes kept by reference, a part at a time.

    ``again``'s item ``k`` is ``previous``'s item ``indexes[k]`` (ascending).  The
    merged outcome is written under ``where`` as new parts, one per part of
    ``previous``; only the failures of one part are looked at in it.
    """
    retried = zip(indexes, (row for row in iter_items(str(again["ref"]))), strict=False)
    pending = next(retried, None)
    parts: list[list[Any]] = []
    failed = 0

    def write_all(fh: IO[bytes]) -> None:
        nonlocal pending, failed
        for first, values, failures in iter_chunks(str(previous["ref"])):
            end = first + len(values)
            errors: list[ItemFailure] = []
            for index in sorted(failures):
                while pending is not None and pending[0] < index:  # not a failure before: nothing to merge
                    pending = next(retried, None)
                if pending is not None and pending[0] == index:
                    _, (_, value, failure) = pending
                    pending = next(retried, None)
                    if failure is not None:
                        errors.append({**failure, "index": index})
                    else:
                        values[index - first] = value
                    continue
                errors.append(failures[index])
            while pending is not None and pending[0] < end:
                pending = next(retried, None)
            ref = write_part(where, {"start": first, "results": values, "errors": errors, "transient": 0})
            parts.append([first, len(values), ref["url"], first])
            for failure in errors:
                fh.write(_dumps(failure) + b"\n")
            failed += len(errors)

    storage.write_atomic(storage.join(where, ERRORS), write_all)
    total = previous["total"]
    outcome: OutcomeDoc = {
        "job_id": job_id,
        "task": previous["task"],
        "total": total,
        "succeeded": total - failed,
        "failed": failed,
        "results": [],
        "errors": [],
        "retry_of": previous["job_id"],
        "ref": where,
    }
    write_json(storage.join(where, OUTCOME), {**outcome, "parts": parts})
    return outcome


def load_manifest(where: str) -> dict[str, Any]:
    """The outcome's ``outcome.json``; InfrastructureError, naming the location, if it cannot be read."""
    try:
        manifest: dict[str, Any] = read_json(storage.join(where, OUTCOME))
    except (OSError, ValueError) as exc:
        raise InfrastructureError(
            f"cannot read the results at {where} ({exc.__class__.__name__}: {exc}): this machine must "
            "reach the workers' results location (FANOUT_RESULTS_URL), and they expire with the job"
        ) from None
    return manifest


def iter_errors(where: str) -> Iterator[ItemFailure]:
    """The errors of an outcome kept by reference, one per item in index order, read line by line."""
    for entry in _error_lines(where):
        yield from _items(entry)


def _error_lines(where: str) -> Iterator[ItemFailure]:
    """The lines of an outcome's ``errors.jsonl``: a failure, or a :func:`failure_run`."""
    url = storage.join(where, ERRORS)
    if storage.is_local(url):
        with open(url, "rb") as fh:
            for line in fh:
                yield json.loads(line)
        return
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        for line in fh:
            yield json.loads(line)


def failed_for(outcome: OutcomeDoc, reason: str | None) -> int:
    """How many of the outcome's items failed for ``reason`` (a run of them counted at once)."""
    if reason is None:
        return 0
    where = outcome.get("ref")
    entries = _error_lines(where) if where else iter(outcome["errors"])
    return sum(_failed(entry) for entry in entries if entry["error"] == reason)


#: A run of consecutive items: the first one's index, their results (None where one
#: failed) and the failures among them by index.
Chunk = tuple[int, list[Any], dict[int, ItemFailure]]


def iter_chunks(where: str) -> Iterator[Chunk]:
    """An outcome kept by reference, in input order, one part (a chunk) at a time (none for a fold)."""
    manifest = load_manifest(where)
    if manifest.get("folded"):  # a fold keeps no per-item results (workers/folding.py)
        return
    errors = iter_errors(where)
    pending = next(errors, None)
    total = int(manifest["total"])
    expected = 0

    def failures_until(end: int) -> dict[int, ItemFailure]:
        nonlocal pending
        found: dict[int, ItemFailure] = {}
        while pending is not None and pending["index"] < end:
            found[pending["index"]] = pending
            pending = next(errors, None)
        return found

    def lost(low: int, high: int) -> Chunk:
        found = failures_until(high)
        failures = {i: found.get(i) or {"index": i, "input": None, "error": LOST} for i in range(low, high)}
        return low, [None] * (high - low), failures

    for start, count, url, first in manifest["parts"]:
        if first > expected:
            yield lost(expected, first)
        end = min(start + count, total)
        values = read_part(url)["results"][first - start : end - start]
        failures = failures_until(end)
        for index in failures:
            values[index - first] = None
        yield first, values, failures
        expected = end
    if total > expected:
        yield lost(expected, total)


def chunks(outcome: OutcomeDoc) -> Iterator[Chunk]:
    """An outcome in input order, a chunk at a time, held or by reference (none for a fold)."""
    if outcome.get("folded"):
        return
    where = outcome.get("ref")
    if where:
        yield from iter_chunks(where)
        return
    yield 0, outcome["results"], {int(e["index"]): e for e in outcome["errors"]}


def iter_items(where: str) -> Iterator[tuple[int, Any, ItemFailure | None]]:
    """``(index, result, failure)`` for every item of an outcome kept by reference, in input order.

    One part is in memory at a time; ``failure`` is None for an item that succeeded.
    """
    for first, values, failures in iter_chunks(where):
        for offset, value in enumerate(values):
            yield first + offset, value, failures.get(first + offset)


def rows(outcome: OutcomeDoc) -> Iterator[tuple[int, Any, ItemFailure | None]]:
    """``(index, result, failure)`` for every item of an outcome in input order, held or by reference."""
    for first, values, failures in chunks(outcome):
        for offset, value in enumerate(values):
            yield first + offset, value, failures.get(first + offset)


def outcome_errors(outcome: OutcomeDoc) -> Iterator[ItemFailure]:
    """The failures of an outcome by index, held or read from the results location."""
    where = outcome.get("ref")
    return iter_errors(where) if where else iter(outcome["errors"])


def materialize(outcome: OutcomeDoc) -> OutcomeDoc:
    """An outcome kept by reference as an ordinary one, every value in memory (for small uses)."""
    where = outcome.get("ref")
    if not where:
        return outcome
    results = [value for _, value, _ in iter_items(where)]
    return {**outcome, "results": results, "errors": list(iter_errors(where))}
