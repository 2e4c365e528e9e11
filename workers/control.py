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
from typing import TYPE_CHECKING, Any

import redis
from celery.worker.control import control_command

from workers import keys
from workers.errors import JobStopped

if TYPE_CHECKING:
    from workers.batchio import BatchEnd

logger = logging.getLogger(__name__)

#: The longest a running batch goes between two looks at its job's stop reason, seconds.
CHECK_EVERY_S = 0.25


class JobControl:
    """A header task's view of its job's stop reason and failure budget."""

    def __init__(
        self, client: Any, group_id: str, expires: int, stop: bytes | None, budget: bytes | None
    ) -> None:
        """``stop``, ``budget``: the job's keys as read when the batch started
        (:func:`workers.batchio.start_batch`)."""
        self.client = client
        self.group_id = group_id
        self.expires = expires
        self.checked_at = time.monotonic()
        self.reason: str | None = stop.decode() if stop else None
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

    def count_failures(self, end: BatchEnd, failed: int) -> None:
        """Add a batch's failed items to the job's count, in the batch's last round trip (``end``),
        and stop the job there once it is over budget: before the chord's callback can run."""
        if self.budget is None or failed <= 0:
            return
        limit, total = self.budget
        counter, stop = keys.failures(self.group_id), keys.stop(self.group_id)

        def queue(pipe: Any) -> None:
            pipe.eval(COUNT_FAILURES_LUA, 2, counter, stop, failed, self.expires, limit, total)

        def then(replies: list[Any]) -> None:
            count, *reason = replies[0]
            if reason:
                logger.warning("job of group %s stopped: %s", self.group_id, reason[0].decode())
            logger.debug("job of group %s: %d item(s) failed so far", self.group_id, count)

        end.add("counting the job's failures", queue, then)


#: Add ARGV[1] failures to KEYS[1] (expiring in ARGV[2] s); past the budget (ARGV[3] of ARGV[4]
#: items), set the stop reason KEYS[2] unless the job is stopped already.  Returns the count,
#: and the reason if this call set it.
COUNT_FAILURES_LUA = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if count > tonumber(ARGV[3]) then
    local reason = 'failure budget exceeded: ' .. count .. ' of ' .. ARGV[4] ..
        ' items failed (at most ' .. ARGV[3] .. ' allowed)'
    if redis.call('SET', KEYS[2], reason, 'NX', 'EX', ARGV[2]) then
        return {count, reason}
    end
end
return {count}
"""


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
