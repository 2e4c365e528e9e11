"""A batch's own Redis commands in two round trips: one as it starts, one with its chord report.

A worker on another machine waits a network round trip for every Redis command it
needs an answer to (docs/performance.md, "Workers on other machines").  So a header
task gathers its own commands:

* :func:`start_batch`, as the batch starts: its run counted (:mod:`workers.attempts`)
  and its job's stop reason and failure budget read (:mod:`workers.control`), in one
  pipeline;
* :class:`BatchEnd`, once its items are done: every write of a finished batch (its run
  counts dropped, its failures counted, ...), queued by whoever needs one with
  :meth:`BatchEnd.add`.  The result backend sends them in the same MULTI/EXEC as the
  batch's chord report and its done bit (:mod:`workers.backend`): one round trip, all
  or nothing, and before the chord's callback can run.  A batch outside a chord sends
  them on its own (:meth:`BatchEnd.send`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers import keys
from workers.backend import BATCH_END_ATTRIBUTE, REDIS_FULL, retrying

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """What the batch's first round trip found."""

    #: Runs of this batch started, this one included (1 when Redis was full: run uncounted).
    runs: int
    #: The job's stop reason and failure budget, as stored (None: not set, or no job group).
    stop: bytes | None
    budget: bytes | None


def start_batch(client: Any, task_id: str, group_id: str | None, expires: int) -> Started:
    """Count a run of batch ``task_id`` and read its job's stop reason and budget: one round trip.

    Not a transaction: a Redis at its maxmemory refuses the count (the batch then runs
    uncounted, see :class:`~workers.attempts.RedisAttemptLog`) but still answers the read.
    Retried while Redis is down, as each of the two was on its own.
    """
    runs_key = keys.batch_runs(task_id)

    def both() -> list[Any]:
        with client.pipeline(transaction=False) as pipe:
            pipe.incr(runs_key).expire(runs_key, expires)
            if group_id is not None:
                pipe.mget(keys.stop(group_id), keys.budget(group_id))
            return list(pipe.execute(raise_on_error=False))

    replies = retrying(both, "counting a batch run and reading its job's stop reason")
    for reply in replies[2:]:
        if isinstance(reply, Exception):  # only the count may be refused (a full Redis)
            raise reply
    runs = replies[0]
    if isinstance(runs, REDIS_FULL):
        logger.warning(
            "Redis is full (at its maxmemory): counting a batch run skipped, the batch runs uncounted"
        )
        runs = 1
    elif isinstance(runs, Exception):
        raise runs
    stop, budget = replies[2] if group_id is not None else (None, None)
    return Started(int(runs), stop, budget)


#: Queues a step's commands on a pipeline.
Queue = Callable[[Any], Any]
#: Reads the step's replies, once the pipeline has run.
Then = Callable[[list[Any]], None]


@dataclass
class _Step:
    what: str
    queue: Queue
    then: Then | None


@dataclass
class BatchEnd:
    """The writes of a finished batch, sent in one round trip with its chord report.

    ``add`` a step: a function that queues its commands on the pipeline, and optionally
    one that reads their replies.  The steps run in the order added, inside one
    MULTI/EXEC, before the chord report, so a step's writes are in Redis before the
    job's fan-in can run.
    """

    steps: list[_Step] = field(default_factory=list)
    #: The steps have been sent (a report retried after a lost connection does not count twice).
    sent: bool = False

    def add(self, what: str, queue: Queue, then: Then | None = None) -> None:
        """Add a step; ``what`` names it in logs."""
        self.steps.append(_Step(what, queue, then))

    def queue(self, pipe: Any) -> list[tuple[_Step, slice]]:
        """Queue every step's commands on ``pipe``; where each step's replies will be."""
        placed = []
        for step in self.steps if not self.sent else []:
            first = len(pipe)
            step.queue(pipe)
            placed.append((step, slice(first, len(pipe))))
        return placed

    def settle(self, placed: list[tuple[_Step, slice]], replies: list[Any]) -> None:
        """The pipeline ran: mark the steps sent and hand each its replies."""
        self.sent = True
        for step, where in placed:
            if step.then is not None:
                try:
                    step.then(replies[where])
                except Exception:  # a reply reader never fails the batch: its writes are made
                    logger.warning("reading the replies of %s failed", step.what, exc_info=True)

    def send(self, client: Any) -> None:
        """Send the steps on their own (a batch with no chord report to ride with): one round trip."""
        if self.sent or not self.steps:
            return

        def run() -> None:
            with client.pipeline() as pipe:
                placed = self.queue(pipe)
                self.settle(placed, pipe.execute())

        retrying(run, "the writes of a finished batch")


def batch_end(request: Any) -> BatchEnd:
    """The :class:`BatchEnd` of the task running ``request`` (made on first use), where its chord
    report finds it (:class:`workers.backend.RetryingChordMixin`)."""
    end = getattr(request, BATCH_END_ATTRIBUTE, None)
    if not isinstance(end, BatchEnd):
        end = BatchEnd()
        setattr(request, BATCH_END_ATTRIBUTE, end)
    return end
