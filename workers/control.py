"""Stopping a job while it runs: cancel, and a failure budget.

A job is stopped by one key in Redis, its *stop reason* (``cancelled``, or
``failure budget exceeded: ...``), keyed by the chord's group id, which every
header task knows from its request.  Header tasks read it:

* when a batch starts: a queued batch of a stopped job never runs an item;
* between items, at most every :data:`CHECK_EVERY_S` seconds: a running batch
  stops at its next item, and the check costs one clock read per item;
* ``--terminate`` also interrupts the items running now, through a remote
  control command (:func:`fanout_interrupt`) that raises the soft time limit
  in the pool processes running the job's batches.

The items not run fail with the stop reason; the fan-in completes as always.
A failure budget is enforced by the header tasks too: each adds its batch's
failures to a counter, and the one that goes past the budget stops the job.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import redis
from celery.worker.control import control_command

from workers import keys
from workers.backend import retrying
from workers.errors import JobStopped

logger = logging.getLogger(__name__)

#: The longest a running batch goes between two looks at its job's stop reason, seconds.
CHECK_EVERY_S = 0.25


class JobControl:
    """A header task's view of its job's stop reason and failure budget."""

    def __init__(self, client: Any, group_id: str, expires: int) -> None:
        self.client = client
        self.group_id = group_id
        self.expires = expires
        self.checked_at = time.monotonic()
        reason, budget = retrying(
            lambda: client.mget(keys.stop(group_id), keys.budget(group_id)), "reading the job's stop reason"
        )
        self.reason: str | None = reason.decode() if reason else None
        self.budget = _budget(budget)

    def check(self) -> None:
        """Raise JobStopped if the job was stopped; looks in Redis at most every CHECK_EVERY_S."""
        if self.reason is None:
            now = time.monotonic()
            if now - self.checked_at < CHECK_EVERY_S:
                return
            self.checked_at = now
            self.reason = self.stop_reason()
        if self.reason is not None:
            raise JobStopped(self.reason)

    def stop_reason(self) -> str | None:
        """The job's stop reason now (one GET); None while Redis does not answer.

        A look that fails is no reason to fail an item (or, from the soft limit's
        handler, a whole batch): the next look, CHECK_EVERY_S later, sees a stop.
        """
        try:
            raw = self.client.get(keys.stop(self.group_id))
        except redis.RedisError as exc:
            logger.warning("could not read the stop reason of job group %s: %s", self.group_id, exc)
            return None
        return raw.decode() if raw else None

    def count_failures(self, failed: int) -> None:
        """Add a batch's failed items to the job's count; stop the job once it is over budget."""
        if self.budget is None or failed <= 0:
            return
        limit, total = self.budget
        count = int(retrying(lambda: self._add(failed), "counting the job's failures"))
        if count > limit:
            reason = f"failure budget exceeded: {count} of {total} items failed (at most {limit} allowed)"
            stop = keys.stop(self.group_id)
            if retrying(lambda: self.client.set(stop, reason, nx=True, ex=self.expires), "stopping the job"):
                logger.warning("job of group %s stopped: %s", self.group_id, reason)

    def _add(self, failed: int) -> int:
        with self.client.pipeline() as pipe:
            count, _ = (
                pipe.incrby(keys.failures(self.group_id), failed)
                .expire(keys.failures(self.group_id), self.expires)
                .execute()
            )
        return int(count)


def _budget(raw: bytes | None) -> tuple[int, int] | None:
    """``(most failures allowed, items in the job)`` from its stored form ``"limit/total"``."""
    if not raw:
        return None
    limit, _, total = raw.decode().partition("/")
    return int(limit), int(total or 0)


@control_command(  # type: ignore[untyped-decorator]
    args=[("group_id", str)],
    signature="<group_id>",
)
def fanout_interrupt(state: Any, group_id: str) -> dict[str, str]:
    """Interrupt the items of job ``group_id`` running on this worker (``fanout cancel --terminate``).

    The pool processes running its batches get SIGUSR1, prefork's soft time
    limit signal: the item running raises SoftTimeLimitExceeded, and the batch
    returns at once with what it finished, the rest failed with the job's stop
    reason.  Nothing is revoked, so the chord still completes.
    """
    from celery.worker import state as worker_state

    interrupted = 0
    for request in list(worker_state.active_requests):
        if request.group == group_id and request.worker_pid:
            try:
                os.kill(request.worker_pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
            interrupted += 1
    return {"ok": f"interrupted {interrupted} batch(es)"}
