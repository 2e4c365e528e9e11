"""The index of jobs: what ``fanout jobs`` lists and the exporter counts, without a key scan.

* When a job's record is written (orchestrator/send.py, stream.py), :func:`index_job` adds it
  to ``keys.JOBS``, a sorted set scored by when it was sent.
* When its fan-in is done (workers/callback.py), :func:`record_end` writes its
  summary (``keys.job_end``: state, item counts, when it ended) and adds it to
  the sorted set of its final state (``keys.jobs_ended``).
* Running jobs are those in ``keys.JOBS`` without a summary: their counts come
  from ``keys.job_counts``, which the workers raise at each batch's end.

A job's record expires ``result_expires`` seconds after it was sent: :func:`prune`
drops the index entries older than that (one ZREMRANGEBYSCORE per set), and the
readers drop entries whose records are gone sooner (a flushed database).
"""

from __future__ import annotations

import json
import time
from typing import Any, TypedDict

from workers import keys

RUNNING = "running"
#: A finished job's state: every item succeeded; some failed (or the job was stopped by its
#: failure budget, or its reduce failed); it was cancelled.
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)
STATES = (RUNNING, *ENDED)
#: What becomes of an item: it succeeded, failed, or was cancelled (not run: its job was stopped).
OUTCOMES = ("succeeded", "failed", "cancelled")


class Summary(TypedDict):
    state: str
    succeeded: int
    failed: int
    cancelled: int
    finished_at: float


def index_job(pipe: Any, job_id: str, sent_at: float, expires: int) -> None:
    """Queue on ``pipe`` (the one that writes the job's record) the job's entry in the index."""
    pipe.zadd(keys.JOBS, {job_id: sent_at})
    prune(pipe, sent_at, expires)


def prune(pipe: Any, now: float, expires: int) -> None:
    """Queue on ``pipe`` the removal of the index entries of jobs sent over ``expires`` seconds ago."""
    cutoff = f"({now - expires}"
    for key in (keys.JOBS, *(keys.jobs_ended(state) for state in ENDED)):
        pipe.zremrangebyscore(key, "-inf", cutoff)


def forget(client: Any, job_ids: list[str]) -> None:
    """Drop ``job_ids`` from the index (their records are gone)."""
    if not job_ids:
        return
    with client.pipeline(transaction=False) as pipe:
        for key in (keys.JOBS, *(keys.jobs_ended(state) for state in ENDED)):
            pipe.zrem(key, *job_ids)
        pipe.execute()


def final_state(outcome: dict[str, Any], cancelled_reason: str) -> str:
    """A finished job's state from its outcome document (workers/fanin.py)."""
    stopped = outcome.get("stopped")
    if stopped == cancelled_reason:
        return CANCELLED
    if outcome.get("failed") or stopped or outcome.get("reduce_error"):
        return FAILED
    return DONE


def summary(outcome: dict[str, Any], counts: dict[bytes, bytes], cancelled_reason: str) -> Summary:
    """The summary of a finished job: its outcome's counts; the cancelled ones as the workers counted them."""
    failed = int(outcome.get("failed") or 0)
    cancelled = min(failed, int(counts.get(b"cancelled") or 0))
    return {
        "state": final_state(outcome, cancelled_reason),
        "succeeded": int(outcome.get("succeeded") or 0),
        "failed": failed - cancelled,
        "cancelled": cancelled,
        "finished_at": time.time(),
    }


def record_end(client: Any, job_id: str, group_id: str | None, outcome: dict[str, Any], expires: int) -> None:
    """Write job ``job_id``'s summary and move it to its final state's set (two round trips)."""
    from workers.fanin import CANCELLED as cancelled_reason

    with client.pipeline(transaction=False) as pipe:
        pipe.zscore(keys.JOBS, job_id)
        pipe.hgetall(keys.job_counts(group_id or job_id))
        sent_at, counts = pipe.execute()
    if sent_at is None:  # not indexed (sent by an older client) or expired already
        return
    done = summary(outcome, counts or {}, cancelled_reason)
    with client.pipeline(transaction=False) as pipe:
        # Expires when the job's record does: both were sent at sent_at.
        left = max(1, int(sent_at + expires - time.time()))
        pipe.set(keys.job_end(job_id), json.dumps(done), ex=left)
        pipe.zadd(keys.jobs_ended(done["state"]), {job_id: sent_at})
        pipe.execute()
