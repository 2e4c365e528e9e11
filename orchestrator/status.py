"""``fanout status``: find a job sent earlier, from the result backend, and show or await it.

Everything comes from Redis: the job's record (written when it was sent), the
count of finished batches and the callback's result.  They live as long as
the results do (``FANOUT_RESULT_EXPIRES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.states import READY_STATES

from orchestrator.follow import batches_done, callback_meta
from workers import connections, keys
from workers.errors import InfrastructureError
from workers.fanin import CANCELLED, OutcomeDoc

if TYPE_CHECKING:  # orchestrator.jobs builds on this module
    from orchestrator.jobs import Job


@dataclass(frozen=True)
class Status:
    job: Job
    state: str  # "running", or the callback's final state: SUCCESS, FAILURE, REVOKED
    batches_done: int
    outcome: OutcomeDoc | None  # once state is SUCCESS
    finished_at: float | None
    #: Why the job was stopped ("cancelled", "failure budget exceeded: ..."), if it was.
    stopped: str | None = None
    #: How many of its batches the workers' healer sent again (Redis dropped their messages).
    healed: int = 0
    #: Why it cannot complete, if the healer found a lost batch it could not send again.
    unhealable: str | None = None

    @property
    def shown_state(self) -> str:
        """The state as a person reads it: running, cancelling, SUCCESS, CANCELLED or STOPPED."""
        if self.stopped is None:
            return self.state
        if self.outcome is None:
            return "cancelling" if self.stopped == CANCELLED else "stopping"
        return "CANCELLED" if self.stopped == CANCELLED else "STOPPED"

    @property
    def items_done(self) -> int:
        if self.outcome is not None:
            return self.job.total
        if self.job.spec.chunk and self.job.batches:  # a streamed job's batches differ in size
            return self.job.total * self.batches_done // self.job.batches
        return min(self.job.total, self.batches_done * self.job.batch_size)

    @property
    def elapsed_s(self) -> float:
        if self.job.sent_at is None or self.finished_at is None:
            return 0.0
        return max(0.0, self.finished_at - self.job.sent_at)

    def document(self) -> dict[str, Any]:
        """The ``--json`` document of a job still running (a finished one prints its outcome)."""
        return {
            "job_id": self.job.job_id,
            "task": self.job.task,
            "state": self.shown_state,
            "stopped": self.stopped,
            "total": self.job.total,
            "batches": self.job.batches,
            "batches_done": self.batches_done,
            "items_done": self.items_done,
            "items_pending": self.job.total - self.items_done,
            "healed_batches": self.healed,
            "unhealable": self.unhealable,
        }

    def line(self) -> str:
        healed = f"; {self.healed} lost batch(es) sent again" if self.healed else ""
        cannot = f"; cannot complete: {self.unhealable}" if self.unhealable else ""
        return (
            f"job {self.job.job_id} ({self.job.task}): {self.shown_state}, {self.batches_done} of "
            f"{self.job.batches} batches done (about {self.items_done} of {self.job.total} items), "
            f"{self.job.total - self.items_done} pending{healed}{cannot}"
        )


def job_status(job: Job) -> Status:
    """Where ``job`` stands now: O(1) in Redis."""
    app, job_id = job.app, job.job_id
    meta = callback_meta(app, job_id)
    if meta is None or meta.get("status") not in READY_STATES:
        raw, healed, unhealable = connections.backend(app).mget(
            keys.stop(job.group_id), keys.healed(job_id), keys.unhealable(job_id)
        )
        return Status(
            job,
            "running",
            _batches_done(app, job.group_id),
            None,
            None,
            raw.decode() if raw else None,
            int(healed or 0),
            unhealable.decode() if unhealable else None,
        )
    state = str(meta["status"])
    if state != "SUCCESS":
        raise InfrastructureError(f"job {job_id} ended in {state}: {meta.get('result')!r}")
    done_at = meta.get("date_done")
    finished = _timestamp(done_at) if done_at else None
    outcome: OutcomeDoc = meta["result"]
    return Status(job, state, job.batches, outcome, finished, outcome.get("stopped"))


def _batches_done(app: Celery, group_id: str) -> int:
    """How many of a running job's batches the chord has counted.

    The chord's join (one ZCARD) until the chord has them all; the join is gone
    once it has sent its callback (a cancelled job's fan-in, while it runs, as any
    other's), and then the done bitmap says every batch is in (one BITCOUNT).
    """
    done = batches_done(app, group_id)
    return done or int(connections.backend(app).bitcount(keys.done(group_id)))


def _timestamp(value: Any) -> float | None:
    from datetime import datetime

    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when.timestamp()
