"""``fanout status``: find a job sent earlier, from the result backend, and show or await it.

Everything comes from Redis: the job's record (written when it was sent), the
count of finished batches and the callback's result.  They live as long as
the results do (``FANOUT_RESULT_EXPIRES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.states import READY_STATES

from orchestrator.run import batches_done, callback_meta, load_record
from workers import connections, keys
from workers.errors import FanoutError, InfrastructureError
from workers.fanin import CANCELLED, Outcome


class UnknownJob(FanoutError):
    """No job with that id is in Redis: never sent there, or expired."""


@dataclass(frozen=True)
class StoredJob:
    """A job as recorded when it was sent."""

    job_id: str
    group_id: str
    task: str
    total: int
    batch_size: int
    batches: int
    sent_at: float | None
    output: str = "jsonl"
    spec: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, app: Celery, job_id: str) -> StoredJob:
        record = load_record(app, job_id)
        if record is None:
            raise UnknownJob(
                f"no job {job_id} in Redis: not sent to this Redis (FANOUT_REDIS_URL), "
                "or its results expired (FANOUT_RESULT_EXPIRES)"
            )
        return cls(
            job_id=str(record["job_id"]),
            group_id=str(record["group_id"]),
            task=str(record["task"]),
            total=int(record["total"]),
            batch_size=int(record["batch_size"]),
            batches=int(record["batches"]),
            sent_at=record.get("sent_at"),
            output=str(record.get("output") or "jsonl"),
            spec=dict(record.get("spec") or {}),
        )


@dataclass(frozen=True)
class Status:
    job: StoredJob
    state: str  # "running", or the callback's final state: SUCCESS, FAILURE, REVOKED
    batches_done: int
    outcome: Outcome | None  # once state is SUCCESS
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


def job_status(app: Celery, job_id: str) -> Status:
    """Where ``job_id`` stands now."""
    job = StoredJob.load(app, job_id)
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
    outcome: Outcome = meta["result"]
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
