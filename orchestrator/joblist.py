"""``fanout jobs``: every job still kept, running or finished, read from the job index.

Three round trips whatever the number of jobs or their size (workers/jobindex.py):
the index (running ids and the newest ones), then the records and summaries of
those, then the item counts of the running ones.  No key is scanned.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from workers import connections, jobindex, keys

#: How many jobs ``fanout jobs`` lists without ``--all`` (every running job is listed besides).
DEFAULT_LIMIT = 20


@dataclass(frozen=True)
class JobRow:
    job_id: str
    task: str
    state: str  # running, done, failed, cancelled
    succeeded: int
    failed: int
    cancelled: int
    total: int
    sent_at: float
    #: When its fan-in finished (None while it runs).
    finished_at: float | None
    host: str

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.sent_at)

    def items_per_s(self, now: float) -> float:
        """Items finished a second, from when it was sent to now (or to its end)."""
        elapsed = (self.finished_at or now) - self.sent_at
        finished = self.succeeded + self.failed + self.cancelled
        return finished / elapsed if elapsed > 0 else 0.0

    def document(self, now: float) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "task": self.task,
            "state": self.state,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "total": self.total,
            "items_per_s": round(self.items_per_s(now), 1),
            "age_s": round(self.age_s(now), 1),
            "sent_at": self.sent_at,
            "finished_at": self.finished_at,
            "host": self.host,
        }


def list_jobs(
    app: Celery, expires: int, limit: int | None = DEFAULT_LIMIT, now: float | None = None
) -> list[JobRow]:
    """The jobs in the index, newest first: every running one, and the newest ``limit`` (None: all)."""
    client = connections.backend(app)
    now = time.time() if now is None else now
    ended = [keys.jobs_ended(state) for state in jobindex.ENDED]
    with client.pipeline(transaction=False) as pipe:
        jobindex.prune(pipe, now, expires)
        pipe.zdiff([keys.JOBS, *ended], withscores=True)  # the running ones
        pipe.zrevrange(keys.JOBS, 0, -1 if limit is None else limit - 1, withscores=True)
        *_, running, newest = pipe.execute()
    scored = {_text(job_id): float(score) for job_id, score in [*_pairs(running), *newest]}
    ids = sorted(scored, key=lambda job_id: scored[job_id], reverse=True)
    if not ids:
        return []
    with client.pipeline(transaction=False) as pipe:
        pipe.mget([keys.job(job_id) for job_id in ids])
        pipe.mget([keys.job_end(job_id) for job_id in ids])
        raw_records, raw_ends = pipe.execute()
    gone = [job_id for job_id, raw in zip(ids, raw_records, strict=True) if raw is None]
    jobindex.forget(client, gone)  # expired or flushed: the list forgets them
    found = [
        (job_id, json.loads(raw), json.loads(end) if end else None)
        for job_id, raw, end in zip(ids, raw_records, raw_ends, strict=True)
        if raw is not None
    ]
    unfinished = [(job_id, record) for job_id, record, end in found if end is None]
    with client.pipeline(transaction=False) as pipe:
        for _, record in unfinished:
            pipe.hgetall(keys.job_counts(str(record["group_id"])))
        counts = dict(zip([job_id for job_id, _ in unfinished], pipe.execute(), strict=True))
    return [_row(job_id, record, end, counts.get(job_id) or {}) for job_id, record, end in found]


def _row(
    job_id: str, record: dict[str, Any], end: dict[str, Any] | None, counts: dict[bytes, bytes]
) -> JobRow:
    if end is None:
        state, finished_at = jobindex.RUNNING, None
        succeeded, failed, cancelled = (int(counts.get(name.encode()) or 0) for name in jobindex.OUTCOMES)
    else:
        state, finished_at = str(end["state"]), float(end["finished_at"])
        succeeded, failed, cancelled = (int(end[name]) for name in jobindex.OUTCOMES)
    return JobRow(
        job_id=job_id,
        task=str(record.get("task") or ""),
        state=state,
        succeeded=succeeded,
        failed=failed,
        cancelled=cancelled,
        total=int(record.get("total") or 0),
        sent_at=float(record.get("sent_at") or 0.0),
        finished_at=finished_at,
        host=str(record.get("host") or ""),
    )


def _pairs(values: Any) -> list[tuple[Any, float]]:
    """ZDIFF WITHSCORES as pairs (redis-py gives a flat list under RESP2)."""
    values = list(values or [])
    if values and not isinstance(values[0], list | tuple):
        return list(zip(values[::2], (float(v) for v in values[1::2]), strict=True))
    return [(member, float(score)) for member, score in values]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


HEADERS = ("JOB", "TASK", "STATE", "DONE", "FAILED", "TOTAL", "ITEMS/S", "AGE", "HOST")


def table(rows: list[JobRow], now: float) -> str:
    """The jobs as an aligned table, one row a job (FAILED counts the cancelled items too)."""
    lines = [HEADERS] + [
        (
            row.job_id,
            row.task,
            row.state,
            f"{row.succeeded:,}",
            f"{row.failed + row.cancelled:,}",
            f"{row.total:,}",
            f"{row.items_per_s(now):,.0f}",
            age(row.age_s(now)),
            row.host,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    right = {3, 4, 5, 6, 7}
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def age(seconds: float) -> str:
    """``seconds`` as a person reads an age: 42s, 5m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
