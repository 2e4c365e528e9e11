"""The soft time limit outside the item loop: it fails a batch's items or is held, never the chord.

A batch whose soft limit fired while Redis restarted, before its first item or
after its last, used to fail the whole job with
``ChordError('Dependency ... raised SoftTimeLimitExceeded()')`` (issue 17,
seen once in three runs of ``test_redis_restart_with_aof_mid_chord...``).
These tests make it happen every time.  The result backend is a Redis of its
own, stopped while the broker stays up: the worker's main process keeps its
event loop (and so the soft limit's timer) running, while the pool process
waits for the backend in fanout's retry loop, exactly where the limit fired.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from orchestrator.follow import callback_meta
from orchestrator.local import LocalWorker
from tests.faultkit import RedisServer, kill_all, new_queue, rigged_job, send, worker
from workers.app import celery_config
from workers.settings import Settings

#: The headers' (hard, soft) time limits: a soft limit that fires well inside the outage,
#: a hard one well past it (so what the test sees is the soft limit's doing).
LIMITS = (40, 2)
#: How long the result backend is down: the soft limit fires within it, whatever the
#: worker's main loop was doing (each of its refreshes against a stopped Redis takes ~4 s).
OUTAGE_S = 15.0


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A broker and a result backend, each a ``redis-server`` of the test's own; the backend with AOF."""
    broker = RedisServer(tmp_path / "broker", persistent=False).start()
    backend = RedisServer(tmp_path / "backend", persistent=True).start()
    yield broker, backend
    backend.stop()
    broker.stop()


def split_app(broker: RedisServer, backend: RedisServer) -> tuple[Celery, dict[str, str]]:
    env = {"FANOUT_BROKER_URL": broker.url, "FANOUT_RESULT_BACKEND": backend.url}
    app = Celery("fanout-split", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env(env)))
    return app, env


def wait_for_outcome(app: Celery, job_id: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            meta = callback_meta(app, job_id)
        except redis.RedisError:
            meta = None
        if meta is not None and meta.get("status") in ("SUCCESS", "FAILURE"):
            return meta
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


@pytest.mark.system
@pytest.mark.timeout(180)
def test_soft_limit_before_the_first_item_puts_the_batch_back_and_it_runs_once_redis_answers(
    servers: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    broker, backend = servers
    app, env = split_app(broker, backend)
    queue = new_queue()
    local: LocalWorker = worker(app, queue, tmp_path, "soft-before", env=env, concurrency=1)
    try:
        values = [1, 2, 3]
        job = rigged_job(app, values, 3, queue, limits=LIMITS)
        # The batch starts 3 s after it is sent: the worker holds it (unacked) meanwhile,
        # and the backend is down by then, so the batch's first Redis read waits.
        assert job.signature is not None
        header = job.signature.tasks
        for sig in getattr(header, "tasks", header):
            sig.set(countdown=3)
        send(app, job)
        unacked = redis.Redis.from_url(broker.url)
        deadline = time.monotonic() + 20
        while not unacked.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unacked.hlen("unacked") == 1, "the worker never received the batch"
        backend.stop()
        time.sleep(OUTAGE_S)  # the outage: the fault itself
        backend.start()
        meta = wait_for_outcome(app, job.job_id, 60)
    finally:
        local.stop(timeout=10)
        kill_all(local)
    log = (tmp_path / "soft-before.log").read_text(errors="replace")
    assert "before the first item of batch" in log, "the soft limit did not fire before the first item"
    assert meta["status"] == "SUCCESS", meta["result"]
    outcome = meta["result"]
    assert isinstance(outcome, dict)
    assert outcome["results"] == [2, 4, 6]
    assert (outcome["succeeded"], outcome["failed"]) == (3, 0)


@pytest.mark.system
@pytest.mark.timeout(180)
def test_soft_limit_while_a_finished_batch_reports_is_held_and_the_part_arrives(
    servers: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    broker, backend = servers
    app, env = split_app(broker, backend)
    queue = new_queue()
    marks = tmp_path / "marks"
    marks.mkdir()
    local: LocalWorker = worker(app, queue, tmp_path, "soft-after", env=env, concurrency=1)
    try:
        values = [1]
        # The item takes 1 s: the batch is done within its soft limit (2 s), and then
        # waits for the backend, down since the item started.
        job = rigged_job(app, values, 1, queue, seconds=1.0, marks=marks, limits=LIMITS)
        send(app, job)
        deadline = time.monotonic() + 20
        while not any(marks.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(marks.iterdir()), "the batch never started"
        backend.stop()
        time.sleep(OUTAGE_S)  # the outage: the fault itself
        backend.start()
        meta = wait_for_outcome(app, job.job_id, 60)
    finally:
        local.stop(timeout=10)
        kill_all(local)
    log = (tmp_path / "soft-after.log").read_text(errors="replace")
    assert "soft time limit reached while" in log, "the soft limit did not fire during the report"
    assert meta["status"] == "SUCCESS", meta["result"]
    outcome = meta["result"]
    assert isinstance(outcome, dict)
    assert outcome["results"] == [2]
    assert (outcome["succeeded"], outcome["failed"]) == (1, 0)


def test_the_hold_is_a_no_op_where_billiards_soft_limit_handler_is_not_installed() -> None:
    import signal

    from workers import softlimit

    # This process is no pool process: SIGUSR1 has no soft-limit handler to hold.
    assert signal.getsignal(signal.SIGUSR1) is not None
    assert softlimit.hold("a test") is False
    assert softlimit.release() is False
    with softlimit.held("a test"):
        pass


def test_the_hold_notes_the_soft_limit_and_release_puts_billiards_handler_back() -> None:
    import os
    import signal

    from billiard.pool import soft_timeout_sighandler
    from celery.exceptions import SoftTimeLimitExceeded

    from workers import softlimit

    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)  # as in a pool process
    try:
        assert softlimit.hold("reporting a test batch") is True
        os.kill(os.getpid(), signal.SIGUSR1)  # the soft limit fires: noted, not raised
        time.sleep(0.01)
        assert softlimit.release() is True
        assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler
        with pytest.raises(SoftTimeLimitExceeded):  # released: it raises again
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
    finally:
        softlimit.release()
        signal.signal(signal.SIGUSR1, previous)
