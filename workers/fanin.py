"""Batches and the fan-in: plain functions over JSON-ready values.

A header task processes one *batch*: a run of consecutive items starting at
``start``.  It returns a :class:`Part`; the chord callback merges the parts
into one outcome in input order.  Nothing here knows about Celery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NotRequired, TypedDict

from workers.errors import ItemError, TransientError

#: The error of every item that a cancel kept from running.
CANCELLED = "cancelled"


class ItemFailure(TypedDict):
    index: int
    input: Any
    error: str
    #: A run of ``count`` items from ``index`` on, every one failed for ``error`` (a purge's,
    #: in a job sent by reference: workers/results.py ``failure_run``); readers see one per item.
    count: NotRequired[int]


class Part(TypedDict):
    """What one header task returns: results for items ``start .. start+len(results)-1``."""

    start: int
    results: list[Any]  # None where the item failed
    errors: list[ItemFailure]
    transient: int  # how many of the errors may pass on a retry
    parts: NotRequired[list[Part]]  # several batches reported as one (see :func:`flatten`)
    #: A fold's part (workers/folding.py): how many items it covers (its ``results`` are
    #: empty), and their partial, or why the fold of the batch failed.
    count: NotRequired[int]
    partial: NotRequired[Any]
    fold_error: NotRequired[str]


class OutcomeDoc(TypedDict):
    """The fan-in of a whole job, in input order; ``reduced`` or ``reduce_error`` once a reduce ran."""

    job_id: str
    task: str
    total: int
    succeeded: int
    failed: int
    results: list[Any]
    errors: list[ItemFailure]
    reduced: NotRequired[Any]
    reduce_error: NotRequired[str]
    #: Why the job stopped before all its items ran: "cancelled", "failure budget exceeded: ...".
    stopped: NotRequired[str]
    #: The job whose failed items this one ran again (its outcome is merged in).
    retry_of: NotRequired[str]
    #: Where the results are, for a job sent by reference (``results`` and ``errors``
    #: are then empty here: read them with :mod:`workers.results`).
    ref: NotRequired[str]
    #: A fold (workers/folding.py): no per-item results, ``reduced`` is the merged value.
    folded: NotRequired[bool]


def describe(exc: BaseException) -> str:
    """A one-line reason for ``exc``."""
    if isinstance(exc, ItemError):
        return exc.reason
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if not isinstance(exc, TransientError) else text


def run_batch(
    work: Callable[[Any], Any],
    start: int,
    items: Sequence[Any],
    label: Callable[[Any], Any] = lambda item: item,
    stop_on: tuple[type[BaseException], ...] = (),
    stopped: Callable[[BaseException], tuple[str, str]] = lambda exc: ("stopped", "stopped"),
) -> Part:
    """Apply ``work`` to each item; an item that raises becomes an error entry.

    Any exception from one item is that item's failure, never the batch's: a
    header task must return, or Celery fails the whole chord.  An exception in
    ``stop_on`` (a time limit, a cancel) ends the batch early instead: the items
    done keep their results; ``stopped(exc)`` gives the reasons for the item it
    interrupted and for those not started.
    """
    results: list[Any] = []
    errors: list[ItemFailure] = []
    transient = 0
    for offset, item in enumerate(items):
        try:
            results.append(work(item))
        except stop_on as exc:
            interrupted, not_started = stopped(exc)
            errors.append({"index": start + offset, "input": label(item), "error": interrupted})
            errors.extend(
                {"index": start + k, "input": label(items[k]), "error": not_started}
                for k in range(offset + 1, len(items))
            )
            results.extend([None] * (len(items) - offset))
            break
        except Exception as exc:  # noqa: BLE001 - one bad item must not sink the batch
            results.append(None)
            errors.append({"index": start + offset, "input": label(item), "error": describe(exc)})
            transient += isinstance(exc, (TransientError,))
    return {"start": start, "results": results, "errors": errors, "transient": transient}


def fail_batch(
    start: int, items: Sequence[Any], reason: str, label: Callable[[Any], Any] = lambda i: i
) -> Part:
    """A part in which every item failed for ``reason``."""
    return {
        "start": start,
        "results": [None] * len(items),
        "errors": [
            {"index": start + k, "input": label(item), "error": reason} for k, item in enumerate(items)
        ],
        "transient": 0,
    }


def flatten(parts: Iterable[Part | None]) -> Iterator[Part]:
    """The parts, with the batches of a combined part (``"parts"``: several batches reported as one,
    as a cancel reports the batches it took off the queue) in its place; empty ones left out."""
    for part in parts:
        if not part:
            continue
        inner = part.get("parts")
        if inner:
            yield from flatten(inner)
        else:
            yield part


def merge(parts: Iterable[Part | None], total: int, job_id: str, task: str) -> OutcomeDoc:
    """Merge header parts into one outcome in input order.

    Each index counts once, whatever order the parts arrive in or however often
    a redelivered batch reported it.  An index no part covers is reported as
    lost rather than silently missing.
    """
    results: list[Any] = [None] * total
    seen = [False] * total
    failures: dict[int, ItemFailure] = {}
    for part in flatten(parts):
        start = part["start"]
        for index, failure in ((e["index"], e) for e in part["errors"]):
            if 0 <= index < total and not seen[index]:
                failures[index] = failure
        for offset, value in enumerate(part["results"]):
            index = start + offset
            if not 0 <= index < total or seen[index]:
                continue
            seen[index] = True
            if index not in failures:
                results[index] = value
    for index in range(total):
        if not seen[index]:
            failures[index] = {"index": index, "input": None, "error": "lost: no worker reported this item"}
    errors = [failures[i] for i in sorted(failures)]
    return {
        "job_id": job_id,
        "task": task,
        "total": total,
        "succeeded": total - len(errors),
        "failed": len(errors),
        "results": results,
        "errors": errors,
    }


def merge_retry(previous: OutcomeDoc, again: OutcomeDoc, indexes: Sequence[int], job_id: str) -> OutcomeDoc:
    """``previous`` with its items at ``indexes`` replaced by ``again``'s (item ``k`` is ``indexes[k]``).

    The result is in the original input order: earlier successes carried over,
    the retried items' new results or errors in their original places.
    """
    results = list(previous["results"])
    failures = {e["index"]: e for e in previous["errors"]}
    new_failures = {e["index"]: e for e in again["errors"]}
    for k, index in enumerate(indexes):
        failures.pop(index, None)
        if k in new_failures:
            failures[index] = {**new_failures[k], "index": index}
            results[index] = None
        else:
            results[index] = again["results"][k]
    errors = [failures[i] for i in sorted(failures)]
    total = previous["total"]
    return {
        "job_id": job_id,
        "task": previous["task"],
        "total": total,
        "succeeded": total - len(errors),
        "failed": len(errors),
        "results": results,
        "errors": errors,
        "retry_of": previous["job_id"],
    }
