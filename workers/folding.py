"""A reduce that folds as it goes: each batch folds its results into one partial, the fan-in merges them.

A fanout task declared with ``fold=Fold(step, merge, initial)``::

    @fanout.task(fold=fanout.Fold(add, initial=Counter))
    def count_words(line: str) -> Counter[str]: ...

runs every job the same way as any other, except what travels back:

* each header task folds its batch's results, in input order, into one
  *partial* (``step(partial, result)``, starting from ``initial``) and reports
  the partial and the batch's failures, not the per-item results
  (:func:`fold_part`);
* the partials are merged one at a time into one value (``merge(total, partial)``),
  holding the running total and one partial, never every partial at once: for a
  job sent by reference, by the header tasks as the partials arrive
  (:mod:`workers.running`: each partial is a file, the chord's join carries only
  its reference), and the chord callback merges what they have not
  (:func:`merge_folded`); otherwise by the callback, from the chord's join;
* each index counts once: a batch reported twice (redelivered after its
  worker died) is merged once, by its first index, as :func:`workers.fanin.merge`
  and :func:`workers.results.merge_refs` count it; an index no part covers is
  reported as lost;
* a step or merge that raises leaves the outcome complete (its failures by
  index), with ``reduce_error`` naming the batch or the merge and the reason,
  and no value, as a failed ``reduce`` does.

``merge`` must be associative and commutative (partials merge in the order they
arrive, as Spark's ``reduce`` asks) and ``initial`` its identity
(``merge(initial, p) == p``), as for Dask's ``Bag.fold(binop, combine, initial)``;
which items make up each partial depends on the batch size.
Nothing here knows about Celery.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from workers.errors import BadTask
from workers.fanin import ItemFailure, OutcomeDoc, Part, describe, flatten
from workers.results import LOST

A = TypeVar("A")


@dataclass(frozen=True)
class Fold(Generic[A]):
    """How a task's results are folded: ``step(partial, result) -> partial`` within a batch,
    ``merge(a, b) -> partial`` across batches (``step`` unless given), from ``initial``.

    ``initial`` is a value (copied for each batch, so a step may change its partial in
    place) or a function of no arguments that makes one (``Counter``, ``list``).  A
    partial must be JSON when it leaves its batch (a ``Counter`` is: a dict); the
    merge then receives it as JSON gives it back (a plain dict).
    """

    step: Callable[[A, Any], A]
    merge: Callable[[A, Any], A] | None = None
    initial: Any = None

    def __post_init__(self) -> None:
        for name in ("step", "merge"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise BadTask(f"Fold's {name} must be a function, got {type(value).__name__}")

    def start(self) -> A:
        """A fresh initial partial."""
        initial = self.initial
        if callable(initial):
            made: A = initial()
            return made
        fresh: A = copy.deepcopy(initial)
        return fresh

    def combine(self, a: A, b: Any) -> A:
        return (self.merge or self.step)(a, b)


def _count(part: Any) -> int:
    """How many items a part (or a reference to one) covers."""
    if "count" in part:
        return int(part["count"])
    return len(part.get("results") or ())


def fold_part(fold: Fold[Any], part: Part, json_problem: Callable[[Any], str | None]) -> Part:
    """``part`` with its results folded into ``partial`` (failed items left out), in input order.

    The results are dropped: the part carries its count, its failures and the
    partial.  A step that raises, or a partial that is not JSON, leaves
    ``fold_error`` instead of a partial, naming the item it stopped at.
    """
    results = part["results"]
    failed = {int(e["index"]) for e in part["errors"]}
    start = part["start"]
    folded: Part = {
        "start": start,
        "results": [],
        "count": len(results),
        "errors": part["errors"],
        "transient": part["transient"],
    }
    index = start
    try:
        partial = fold.start()
        for index, value in enumerate(results, start):
            if index not in failed:
                partial = fold.step(partial, value)
    except Exception as exc:  # noqa: BLE001 - reported as the job's reduce_error, never the chord's
        folded["fold_error"] = f"the fold's step raised at item {index}: {describe(exc)}"
        return folded
    problem = json_problem(partial)
    if problem is not None:
        folded["fold_error"] = f"the partial of the batch at item {start} is not JSON: {problem}"
    else:
        folded["partial"] = partial
    return folded


@dataclass
class Folded:
    """The fan-in of a fold: the merged value (or why there is none), and the counts."""

    value: Any
    error: str | None
    failed: int


def merge_folded(
    parts: Iterable[Any],
    total: int,
    fold: Fold[Any] | None,
    read: Callable[[Any], Part],
    write_failure: Callable[[ItemFailure], None],
    stop_on: tuple[type[BaseException], ...] = (),
    running: dict[str, Any] | None = None,
) -> Folded:
    """Merge the partials of ``parts`` (parts, or references that ``read`` opens) in input order.

    Each index counts once: the parts are taken in order of their first index,
    one per first index (a batch reported twice is merged once), and a part
    whose items an earlier one already covered is left out whole (its partial
    cannot be split).  The failures, each once and in index order, go to
    ``write_failure``, with every index no part covers reported as lost.  One
    partial is read (``read``) and held at a time.  Once a step or a merge has
    failed (or an exception in ``stop_on``, a time limit, has stopped it), the
    rest is no longer merged, but the failures are still all reported.

    ``running`` is a running total the header tasks merged as the partials
    arrived (workers/running.py): its value is the start, and the batches it
    covers are not merged again (their failures are read from the part it took).
    """
    chosen: list[Any] = []
    for given in sorted(flatten(parts), key=lambda p: p["start"]):
        if chosen and chosen[-1]["start"] == given["start"]:
            continue
        chosen.append(given)
    value = fold.start() if fold is not None else None
    error = None if fold is not None else "no fold"
    covered: dict[int, Any] = {}
    if running is not None and fold is not None:
        covered = {int(c[0]): {"start": c[0], "count": c[1], "url": c[2]} for c in running["covered"]}
        error = running["error"]
        if error is None:
            try:
                value = fold.combine(value, running["value"])
            except Exception as exc:  # noqa: BLE001 - reported as the job's reduce_error
                error = f"the fold's merge raised on the running total: {describe(exc)}"
    failed = merged = expected = 0

    def lost(until: int) -> None:
        nonlocal failed
        for index in range(expected, until):
            write_failure({"index": index, "input": None, "error": LOST})
            failed += 1

    for ref in chosen:
        start, end = ref["start"], min(ref["start"] + _count(ref), total)
        if start < expected or start >= total:
            continue  # its items (some or all) were counted in an earlier part: its partial cannot be split
        lost(start)
        part: Any = None
        taken = covered.get(start)
        if taken is not None:  # in the running total already: its failures are those of the part it took
            merged += 1
            if taken["url"] != ref.get("url"):
                ref = part = read(taken)
        elif error is None and fold is not None:
            try:
                # A reference carries no partial (and its failures only when they are few): its file has them.
                part = read(ref) if _needs_read(ref) else ref
                if "fold_error" in part:
                    error = str(part["fold_error"])
                elif "partial" in part:  # none: a batch a cancel took off the queue, every item failed
                    value = fold.combine(value, part["partial"])
                    merged += 1
            except stop_on:
                error = f"the merge was stopped by its time limit after {merged} of {len(chosen)} partials"
            except OSError as exc:
                error = f"could not read the partial of the batch at item {start}: {describe(exc)}"
            except Exception as exc:  # noqa: BLE001 - reported as the job's reduce_error
                error = f"the fold's merge raised at the batch of item {start}: {describe(exc)}"
        if "errors" in ref:
            errors = ref["errors"]
        else:
            errors = (part if part is not None and "errors" in part else read(ref))["errors"]
        for entry in errors:
            for failure in _within(entry, start, end):
                write_failure(failure)
                failed += 1
        expected = end
        del part
    lost(total)
    return Folded(None if error else value, error, failed)


def _needs_read(ref: Any) -> bool:
    """Whether ``ref`` is a reference to a part file (not a part in hand)."""
    return "url" in ref and "results" not in ref


def _within(entry: ItemFailure, low: int, high: int) -> Iterator[ItemFailure]:
    """One failure per item of ``entry`` (a failure, or a run of them) within ``low .. high - 1``."""
    first, count = int(entry["index"]), int(entry.get("count", 1))
    if "count" not in entry:
        if low <= first < high:
            yield entry
        return
    for index in range(max(first, low), min(first + count, high)):
        yield {"index": index, "input": None, "error": entry["error"]}


def outcome_of(job_id: str, task: str, total: int, folded: Folded, errors: list[ItemFailure]) -> OutcomeDoc:
    """The outcome of a fold kept in Redis: counts, failures, and the value or ``reduce_error``."""
    outcome: OutcomeDoc = {
        "job_id": job_id,
        "task": task,
        "total": total,
        "succeeded": total - folded.failed,
        "failed": folded.failed,
        "results": [],
        "errors": errors,
        "folded": True,
    }
    if folded.error is not None:
        outcome["reduce_error"] = folded.error
    else:
        outcome["reduced"] = folded.value
    return outcome
