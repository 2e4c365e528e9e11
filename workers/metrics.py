"""What the workers count for the exporter (orchestrator/exporter.py): items, failures, batch durations.

A batch adds its counts at its end, in the pipeline it sends then anyway
(:func:`count_batch` only queues commands: no round trip of its own).  They go
to one hash, ``keys.METRICS``, that never expires, so the counters only go up
whatever jobs expire; and to the job's own counts (``keys.job_counts``), which
``fanout jobs`` shows while the job runs and which expire with it.

Fields of ``keys.METRICS`` (tab-separated: task names hold dots and colons):

* ``items<TAB>OUTCOME<TAB>TASK``: items succeeded, failed or cancelled (not run:
  the job was stopped, by a cancel or its failure budget);
* ``failures<TAB>TASK<TAB>EXCEPTION``: failed items by the exception's class name;
* ``batch<TAB>TASK<TAB>LE``: batches that took at most LE seconds and more than
  the bucket below (not cumulative: the exporter adds them up), with
  ``batch_sum<TAB>TASK`` and ``batch_count<TAB>TASK``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workers import batchio, keys
from workers.fanin import Part

#: The batch duration histogram's upper bounds, seconds: a batch is sized to take seconds
#: (its soft time limit is 20 s by default), and a slow one can take minutes.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)
#: The bounds as Prometheus writes them ("0.5", "+Inf").
BOUNDS = tuple("+Inf" if math.isinf(b) else repr(b) for b in BUCKETS)
SEP = "\t"
#: The class an error's text names ("KeyError: 'text'"), for a failure no exception was seen for.
_NAMED = re.compile(r"([A-Z][A-Za-z0-9_]*): ")


@dataclass
class BatchCounts:
    """A finished batch's items by outcome, and its failures by exception class."""

    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    exceptions: dict[str, int] = field(default_factory=dict)


def le(seconds: float) -> str:
    """The bucket ``seconds`` falls in, as Prometheus writes its bound ("0.5", "+Inf")."""
    return next(label for bound, label in zip(BUCKETS, BOUNDS, strict=True) if seconds <= bound)


def batch_counts(part: Part, stop_reason: str | None, raised: Mapping[str, int]) -> BatchCounts:
    """Count ``part``: its items failed with ``stop_reason`` were cancelled; ``raised`` is the
    exceptions the batch's items raised, by class name (a failure with none is named by its text)."""
    errors = part["errors"]
    cancelled = sum(1 for e in errors if stop_reason is not None and e["error"] == stop_reason)
    failed = len(errors) - cancelled
    exceptions = {name: n for name, n in raised.items() if n > 0}
    unseen = failed - sum(exceptions.values())
    if unseen > 0:  # a soft time limit, an item that killed its process, an unreadable batch
        named = Counter(_named(str(e["error"])) for e in errors if e["error"] != stop_reason)
        for name, n in named.items():
            extra = min(unseen, n - exceptions.get(name, 0)) if name else 0
            if extra > 0:
                exceptions[name] = exceptions.get(name, 0) + extra
                unseen -= extra
        if unseen > 0:
            exceptions["other"] = exceptions.get("other", 0) + unseen
    return BatchCounts(len(part["results"]) - len(errors), failed, cancelled, exceptions)


def _named(error: str) -> str:
    """The exception class an item's error names ("KeyError: 'text'"), or "" if none."""
    match = _NAMED.match(error)
    return match.group(1) if match else "SoftTimeLimitExceeded" if "soft time limit" in error else ""


def count_batch(
    pipe: Any, task: str, group_id: str | None, counts: BatchCounts, seconds: float | None, expires: int
) -> None:
    """Queue a finished batch's counts on ``pipe`` (a Redis pipeline the batch executes anyway).

    ``seconds`` is how long the batch ran (None: it did not run, it was stopped before).
    """
    outcomes = {"succeeded": counts.succeeded, "failed": counts.failed, "cancelled": counts.cancelled}
    for outcome, n in outcomes.items():
        if n:
            pipe.hincrby(keys.METRICS, SEP.join(("items", outcome, task)), n)
    for name, n in counts.exceptions.items():
        pipe.hincrby(keys.METRICS, SEP.join(("failures", task, name)), n)
    if seconds is not None:
        pipe.hincrby(keys.METRICS, SEP.join(("batch", task, le(seconds))), 1)
        pipe.hincrby(keys.METRICS, SEP.join(("batch_count", task)), 1)
        pipe.hincrbyfloat(keys.METRICS, SEP.join(("batch_sum", task)), round(seconds, 6))
    if group_id:
        counted = {outcome: n for outcome, n in outcomes.items() if n}
        for outcome, n in counted.items():
            pipe.hincrby(keys.job_counts(group_id), outcome, n)
        if counted:
            pipe.expire(keys.job_counts(group_id), expires)


def count_at_end(
    request: Any, task: str, group_id: str | None, counts: BatchCounts, seconds: float | None, expires: int
) -> None:
    """:func:`count_batch` as a step of the batch's last writes (``batchio.batch_end``): no round
    trip of its own."""
    batchio.batch_end(request).add(
        "the exporter's counts", lambda pipe: count_batch(pipe, task, group_id, counts, seconds, expires)
    )
