"""Faults: killed workers and pool processes, warm shutdown, redelivery, poison items, stalls, Redis restarts.

Every test runs real ``celery worker`` processes and asserts that each item is
accounted for exactly once in the fan-in.  Rigged work comes from
``tests/faulty.py``; the workers here consume a queue of their own, so the
session's worker never takes their messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from orchestrator.local import LocalWorker
from orchestrator.run import batches_done, submit, wait
from tests.conftest import fanout_command
from tests.faultkit import QUICK, RedisServer, app_for, kill_all, new_queue, rigged_job, worker
from tests.faulty import HANG, KILL, KILL_ONCE
from workers.attempts import MAX_KILLS
from workers.errors import InfrastructureError
from workers.fanin import Outcome
from workers.settings import Settings

pytestmark = pytest.mark.system


@pytest.fixture
def workers_started() -> Iterator[list[LocalWorker]]:
    """Workers a test starts; whatever is left of them is killed afterwards."""
    started: list[LocalWorker] = []
    yield started
    for local in started:
        local.stop(timeout=10)
        kill_all(local)


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_every_index_once(outcome: Outcome, values: list[int]) -> None:
    assert outcome["total"] == len(values)
    assert outcome["results"] == [2 * v for v in values]
    assert (outcome["succeeded"], outcome["failed"], outcome["errors"]) == (len(values), 0, [])


def test_default_visibility_timeout_bounds_the_loss_of_a_worker_to_two_minutes() -> None:
    settings = Settings.from_env({})
    # Redelivery starts at most visibility_timeout + one sweep after the kill, and the
    # redelivered batch then runs for at most the time limit.
    assert settings.visibility_timeout + settings.restore_interval + settings.task_time_limit < 120
    # A healthy message is held at most a wait for a free process plus its run.
    assert settings.visibility_timeout > 2 * settings.task_time_limit


def active_ids(app: Celery, local: LocalWorker, timeout: float = 30) -> set[str]:
    """The ids of the tasks ``local`` is running, once it runs at least one."""
    found: set[str] = set()

    def busy() -> bool:
        replies = app.control.inspect([local.hostname], timeout=1).active() or {}
        found.update(task["id"] for task in replies.get(local.hostname, []))
        return bool(found)

    wait_until(busy, timeout, f"{local.hostname} to be busy")
    return found


def test_kill_9_of_a_worker_with_default_settings_loses_nothing_within_two_minutes(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    queue = new_queue()
    doomed = worker(app, queue, tmp_path, "doomed")
    workers_started.append(doomed)
    survivor = worker(app, queue, tmp_path, "survivor")
    workers_started.append(survivor)
    values = list(range(12))
    job = rigged_job(app, values, 1, queue, seconds=4, limits=None)
    group_id = submit(app, job, 600)
    in_flight = active_ids(app, doomed)
    assert doomed.process is not None
    os.kill(doomed.process.pid, signal.SIGKILL)
    # Its pool children would finish their batch on their own; kill them too, as
    # losing the machine would, so only redelivery can bring that work back.
    kill_all(doomed)
    outcome = wait(app, job, group_id, timeout=120)  # the bound, counted from the kill
    assert_every_index_once(outcome, values)
    survivor_log = (tmp_path / "survivor.log").read_text()
    assert any(task_id in survivor_log for task_id in in_flight), "the lost batches were not redelivered"


def test_sigkill_of_a_pool_process_requeues_its_batch(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    # The way the OOM killer ends a pool process: SIGKILL, once, in the middle of a batch.
    queue = new_queue()
    workers_started.append(worker(app, queue, tmp_path, "oom", env=QUICK))
    marks = tmp_path / "marks"
    marks.mkdir()
    values: list[object] = list(range(8))
    values[5] = [KILL_ONCE, 5, "item5"]
    job = rigged_job(app, values, 4, queue, marks=marks)
    outcome = wait(app, job, submit(app, job, 600), timeout=60)
    assert_every_index_once(outcome, list(range(8)))
    assert (marks / "['once',5,'item5']").exists(), "the item never killed its process"


def test_a_poison_item_is_failed_after_a_capped_number_of_runs_and_the_rest_completes(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    queue = new_queue()
    local = worker(app, queue, tmp_path, "poison", env=QUICK)
    workers_started.append(local)
    marks = tmp_path / "marks"
    marks.mkdir()
    values: list[object] = list(range(10))
    values[6] = [KILL, 6]
    job = rigged_job(app, values, 4, queue, marks=marks)
    outcome = wait(app, job, submit(app, job, 600), timeout=60)
    assert outcome["results"] == [0, 2, 4, 6, 8, 10, None, 14, 16, 18]
    [error] = outcome["errors"]
    assert error["index"] == 6 and error["input"] == [KILL, 6]
    assert "worker process died" in error["error"]
    runs = [p for p in marks.iterdir() if p.name.startswith("['kill',6]")]
    # The first run, which keeps no per-item count, and MAX_KILLS counted ones; never again.
    assert len(runs) == MAX_KILLS + 1
    assert local.process is not None and local.process.poll() is None
    assert app.control.ping([local.hostname], timeout=2), "the worker should still answer"


def test_an_item_past_the_hard_time_limit_is_failed_not_the_chord(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    queue = new_queue()
    env = {**QUICK, "FANOUT_TASK_TIME_LIMIT": "2"}
    workers_started.append(worker(app, queue, tmp_path, "hang", env=env))
    values: list[object] = [0, 1, [HANG, 2], 3]
    job = rigged_job(app, values, 2, queue, limits=(2, 1))
    outcome = wait(app, job, submit(app, job, 600), timeout=60)
    assert outcome["results"] == [0, 2, None, 6]
    [error] = outcome["errors"]
    assert error["index"] == 2 and "hard time limit" in error["error"]


def test_warm_shutdown_of_a_busy_worker_loses_nothing(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    # Default settings: a message lost at shutdown would take 75 s to come back,
    # longer than this test waits, so completing proves nothing was dropped.
    queue = new_queue()
    leaving = worker(app, queue, tmp_path, "leaving")
    workers_started.append(leaving)
    staying = worker(app, queue, tmp_path, "staying")
    workers_started.append(staying)
    values = list(range(12))
    job = rigged_job(app, values, 1, queue, seconds=3, limits=None)
    group_id = submit(app, job, 600)
    running = active_ids(app, leaving)
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    outcome = wait(app, job, group_id, timeout=50)
    assert_every_index_once(outcome, values)
    assert leaving.process.wait(30) == 0, "warm shutdown should end cleanly"
    leaving_log = (tmp_path / "leaving.log").read_text()
    assert all(f"{task_id}] succeeded" in leaving_log for task_id in running), "running tasks should finish"


def test_a_batch_delivered_twice_is_counted_once(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    queue = new_queue()
    marks = tmp_path / "marks"
    marks.mkdir()
    values = list(range(8))
    job = rigged_job(app, values, 2, queue, seconds=0.5, marks=marks, limits=None)
    group_id = submit(app, job, 600)
    # Before any worker consumes: copy the first batch's message, as a redelivery
    # after the batch already finished would (same task id, same chord).
    client = app.backend.client
    first = client.lrange(queue, -1, -1)[0]
    assert json.loads(first)["headers"]["group_index"] == 0
    client.rpush(queue, first)
    workers_started.append(worker(app, queue, tmp_path, "twice"))
    outcome = wait(app, job, group_id, timeout=60)
    # Counted twice, the chord would fire one part early and report a lost batch.
    assert_every_index_once(outcome, values)
    ran = sorted(p.name.split(".")[0] for p in marks.iterdir())
    assert ran.count("0") == ran.count("1") == 2, "the copy should have run too"


def test_a_callback_run_twice_writes_the_manifest_once(
    app: Celery, worker: LocalWorker, photos: Path, tmp_path: Path
) -> None:
    from orchestrator.canvas import build_resize
    from orchestrator.inputs import plan_images

    out = tmp_path / "out"
    plan = plan_images([photos], out)
    job = build_resize(plan.pairs, 64, str(out), batch_size=2)
    outcome = wait(app, job, submit(app, job, 600), timeout=60)
    manifest = out / "manifest.json"
    before = manifest.read_bytes(), manifest.stat().st_ino, manifest.stat().st_mtime_ns
    # The callback's message delivered again: same task id, same parts.
    part = {"start": 0, "results": outcome["results"], "errors": outcome["errors"], "transient": 0}
    again = app.send_task(
        "fanout.collect", args=[[part]], kwargs={"job": job.signature.body.kwargs["job"]}, task_id=job.job_id
    ).get(timeout=30)
    assert again == outcome
    assert (manifest.read_bytes(), manifest.stat().st_ino, manifest.stat().st_mtime_ns) == before
    assert json.loads(before[0])["succeeded"] == outcome["total"] == 6


def test_workers_that_vanish_mid_run_are_reported_with_what_is_pending(
    tmp_path: Path, redis_client: object, workers_started: list[LocalWorker]
) -> None:
    # A database of its own (two below the test one): no other worker answers there.
    base, db = os.environ["FANOUT_REDIS_URL"].rsplit("/", 1)
    app = app_for(f"{base}/{int(db) - 2}")
    queue = new_queue()
    local = worker(app, queue, tmp_path, "vanishing", env={"FANOUT_REDIS_URL": f"{base}/{int(db) - 2}"})
    values = list(range(20))
    job = rigged_job(app, values, 1, queue, seconds=1.0, limits=None)
    group_id = submit(app, job, 600)
    wait_until(lambda: batches_done(app, group_id) >= 1, 30, "the first batch")
    kill_all(local)
    started = time.monotonic()
    with pytest.raises(InfrastructureError) as info:
        wait(app, job, group_id, timeout=90)
    assert time.monotonic() - started < 60, "should not wait out the timeout"
    message = str(info.value)
    assert "no worker is running" in message and job.job_id in message
    assert "of 20 batches done" in message and "pending" in message
    app.backend.client.flushdb()


def test_a_wait_notices_when_redis_lost_the_run_between_two_polls(
    tmp_path: Path, redis_client: object
) -> None:
    # A restart without persistence that no poll saw: the state is simply gone.
    base, db = os.environ["FANOUT_REDIS_URL"].rsplit("/", 1)
    app = app_for(f"{base}/{int(db) - 2}")
    job = rigged_job(app, list(range(4)), 2, new_queue())
    group_id = submit(app, job, 600)
    app.backend.client.flushdb()
    started = time.monotonic()
    with pytest.raises(InfrastructureError) as info:
        wait(app, job, group_id, timeout=120)
    assert time.monotonic() - started < 60, "should not wait out the timeout"
    assert "without persistence" in str(info.value) and job.job_id in str(info.value)


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=bool(request.param)).start()
    yield server
    server.stop()


@pytest.mark.parametrize("own_redis", [True], indirect=True)
def test_redis_restart_with_aof_mid_chord_completes(
    own_redis: RedisServer, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    env = {**QUICK, "FANOUT_REDIS_URL": own_redis.url}
    workers_started.append(worker(app, queue, tmp_path, "aof-a", env=env))
    workers_started.append(worker(app, queue, tmp_path, "aof-b", env=env))
    values = list(range(16))
    job = rigged_job(app, values, 1, queue, seconds=1.0)
    group_id = submit(app, job, 600)
    wait_until(lambda: batches_done(app, group_id) >= 2, 30, "the first batches")
    own_redis.stop()
    time.sleep(2)
    own_redis.start()
    outcome = wait(app, job, group_id, timeout=120)
    assert_every_index_once(outcome, values)


@pytest.mark.parametrize("own_redis", [False], indirect=True)
def test_redis_restart_without_persistence_ends_the_wait_with_exit_3(
    own_redis: RedisServer, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    env = {**QUICK, "FANOUT_REDIS_URL": own_redis.url}
    workers_started.append(worker(app, queue, tmp_path, "volatile", env=env))
    job = rigged_job(app, list(range(30)), 1, queue, seconds=1.0)
    group_id = submit(app, job, 600)
    wait_until(lambda: batches_done(app, group_id) >= 1, 30, "the first batch")
    waiting = subprocess.Popen(
        fanout_command("status", job.job_id, "--wait", "--timeout", "120"),
        env={**os.environ, "FANOUT_REDIS_URL": own_redis.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the CLI is waiting now
        assert waiting.poll() is None
        own_redis.stop()
        time.sleep(1)
        own_redis.start()
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 3, err
    assert "without persistence" in err and job.job_id in err
