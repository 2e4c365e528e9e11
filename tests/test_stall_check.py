"""The waiting client's stall check across a failover that the Redis client rides out itself.

Behind Sentinel, the result backend retries each command until the new master answers, so a
failover raises nothing in the waiting client: one poll just takes seconds. The workers'
registrations (6 s TTL) may expire meanwhile; found missing in the moment before the workers
write them to the new master, they must not make the client exit 3 "no worker is running".
Seen in tests/test_docker_ha.py; here with the Redis reads replaced by a timeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator import follow as run
from workers.errors import InfrastructureError

# Seconds from the start of the wait.
STALL_CHECK_S = 0.8
FAILOVER = (1.0, 1.8)  # a poll that starts in here is answered at its end
REGISTERED_AGAIN = 2.1  # the registrations, expired in the failover, are back
FINISHED = 2.5
APP: Any = object()  # every read that would use it is replaced


@dataclass(frozen=True)
class Job:
    job_id: str = "job"
    total: int = 30
    batch_size: int = 10
    batches: int = 3
    group_id: str = "group"


@pytest.fixture
def timeline(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The wait's Redis reads as a timeline: a job queued behind another (nothing moves), a failover."""
    monkeypatch.setattr(run, "STALL_CHECK_S", STALL_CHECK_S)
    monkeypatch.setattr(run, "SLOW_POLL_S", 0.4)
    monkeypatch.setattr(run, "POLL_S", 0.01)
    state: dict[str, Any] = {"start": time.monotonic(), "looked": []}

    def at() -> float:
        return time.monotonic() - float(state["start"])

    def batches_done(app: Any, group_id: str) -> int:
        if FAILOVER[0] <= at() < FAILOVER[1]:
            time.sleep(FAILOVER[1] - at())
        return 0

    def callback_meta(app: Any, job_id: str) -> dict[str, Any] | None:
        return {"status": "SUCCESS", "result": "outcome"} if at() >= FINISHED else None

    def list_workers(app: Any, queue: str | None = None) -> list[str]:
        state["looked"].append(round(at(), 2))
        return [] if FAILOVER[0] <= at() < REGISTERED_AGAIN else ["celery@worker"]

    monkeypatch.setattr(run, "batches_done", batches_done)
    monkeypatch.setattr(run, "callback_meta", callback_meta)
    monkeypatch.setattr(run, "list_workers", list_workers)
    monkeypatch.setattr(run, "_require_state", lambda app, job, done: None)
    monkeypatch.setattr(run, "_require_healable", lambda app, job, done: None)
    monkeypatch.setattr(run, "stall_cause", lambda app, job_id, pending: None)  # Redis is not full
    return state


def test_a_poll_slowed_by_a_failover_gives_the_workers_time_to_register_again(
    timeline: dict[str, Any],
) -> None:
    # Given a job that does not move, and a failover that holds one poll up for 0.8 s, after
    # which the workers' registrations are missing for 0.3 s
    timeline["start"] = time.monotonic()
    # When the client waits, Then it rides the failover out and gets the outcome
    outcome: Any = run.wait(APP, Job(), timeout=10)  # type: ignore[arg-type]
    assert outcome == "outcome"
    # having looked for workers before the failover, and again only once a stall period had
    # passed after it
    assert timeline["looked"] and all(
        t < FAILOVER[0] or t >= FAILOVER[1] + STALL_CHECK_S for t in timeline["looked"]
    ), timeline["looked"]


def test_with_no_worker_at_all_the_stall_check_still_ends_the_wait(
    timeline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "list_workers", lambda app, queue=None: [])
    timeline["start"] = time.monotonic()
    with pytest.raises(InfrastructureError, match="no worker is running"):
        run.wait(APP, Job(), timeout=10)  # type: ignore[arg-type]
    assert time.monotonic() - timeline["start"] < FAILOVER[0]
