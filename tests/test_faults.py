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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from orchestrator.local import LocalWorker
from orchestrator.run import callback_meta, submit, wait
from tests.conftest import fanout_command
from tests.faultkit import (
    QUICK,
    RedisServer,
    app_for,
    assert_every_index_once,
    counted,
    kill_all,
    new_queue,
    rigged_job,
    wait_until,
    worker,
)
from tests.faulty import HANG, KILL, KILL_ONCE
from workers.attempts import MAX_KILLS
from workers.errors import InfrastructureError
from workers.settings import Settings

pytestmark = pytest.mark.system

# The bounds docs/failures.md states, in seconds, each measured from its event.
#: A worker's unfinished work is done elsewhere within this long of its kill (default settings).
LOST_WORKER_BOUND_S = 120
#: A batch whose pool process was killed has run again and the run completed this soon after the kill.
POOL_LOSS_BOUND_S = 10
#: With no progress for this long, the wait asks whether any worker still answers...
STALL_S = 10
#: ...and reports within this long of the run's last progress when its workers died with it
#: (their registrations expire within 6 s): 10.0 s measured, and a loaded machine's delays.
STALL_REPORT_S = 14
#: After an outage the client noticed, a lost state is reported this soon after Redis answers again.
LOST_STATE_REPORT_S = 2
#: How long the CLI keeps trying a Redis that went away, and how soon after it gives up.
REDIS_GRACE_S = 30
REDIS_GRACE_REPORT_S = 32
#: A visibility timeout no test outlives: only an immediate requeue can bring a batch back.
NO_REDELIVERY = {**QUICK, "FANOUT_VISIBILITY_TIMEOUT": "600"}


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


@pytest.mark.timeout(LOST_WORKER_BOUND_S + 180)  # two worker starts, then the bound from the kill
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
    killed_at = time.monotonic()
    # Its pool children would finish their batch on their own; kill them too, as
    # losing the machine would, so only redelivery can bring that work back.
    kill_all(doomed)
    outcome = wait(app, job, group_id, timeout=LOST_WORKER_BOUND_S + 60)
    recovered_in = time.monotonic() - killed_at
    assert_every_index_once(outcome, values)
    survivor_log = (tmp_path / "survivor.log").read_text()
    assert any(task_id in survivor_log for task_id in in_flight), "the lost batches were not redelivered"
    # The bound as stated, from the kill: visibility timeout, one sweep, one batch.
    assert recovered_in < LOST_WORKER_BOUND_S, f"completed {recovered_in:.0f} s after the kill"
    settings = Settings.from_env({})
    assert recovered_in > settings.visibility_timeout, "only redelivery should bring the lost work back"


def runs_of(marks: Path) -> dict[str, int]:
    """How many times each item of a rigged job ran, by the item's name (its value as marked)."""
    counts: dict[str, int] = {}
    for mark in marks.iterdir():
        name = mark.name.rsplit(".", 2)[0] if mark.name.count(".") >= 2 else None
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_sigkill_of_a_pool_process_reruns_its_batch_once_within_seconds(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    # The way the OOM killer ends a pool process: SIGKILL, once, in the middle of a batch.
    # A 600 s visibility timeout and the default 30 s time limit: neither redelivery nor
    # the time limit's requeue can bring the batch back within the bound, only the pool's
    # noticing its lost process.
    queue = new_queue()
    env = {**NO_REDELIVERY, "FANOUT_TASK_TIME_LIMIT": "30"}
    workers_started.append(worker(app, queue, tmp_path, "oom", env=env))
    marks = tmp_path / "marks"
    marks.mkdir()
    values: list[object] = list(range(8))
    values[5] = [KILL_ONCE, 5, "item5"]
    job = rigged_job(app, values, 4, queue, marks=marks, limits=None)
    outcome = wait(app, job, submit(app, job, 600), timeout=60)
    done_at = time.time()
    assert_every_index_once(outcome, list(range(8)))
    killed = marks / "['once',5,'item5']"  # made by the item just before it kills its process
    assert killed.exists(), "the item never killed its process"
    assert done_at - killed.stat().st_mtime <= POOL_LOSS_BOUND_S
    # One rerun of the killed batch (items 4-7), item by item; the other batch ran once.
    runs = runs_of(marks)
    assert runs == {"0": 1, "1": 1, "2": 1, "3": 1, "4": 2, "['kill-once',5,'item5']": 2, "6": 1, "7": 1}


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
    runs = runs_of(marks)
    # The item: the first run, which keeps no per-item count, and MAX_KILLS counted ones; never again.
    assert runs["['kill',6]"] == MAX_KILLS + 1
    # Its batch (items 4-7): those runs, then one more that reports the item and finishes the rest.
    assert (runs["4"], runs["5"], runs["7"]) == (MAX_KILLS + 2, MAX_KILLS + 2, 1)
    assert all(runs[str(i)] == 1 for i in (0, 1, 2, 3, 8, 9))
    assert local.process is not None and local.process.poll() is None
    assert app.control.ping([local.hostname], timeout=2), "the worker should still answer"


def test_an_item_past_the_hard_time_limit_is_failed_not_the_chord(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    # With a 600 s visibility timeout, only the immediate requeue can rerun the batch.
    queue = new_queue()
    env = {**NO_REDELIVERY, "FANOUT_TASK_TIME_LIMIT": "2"}
    workers_started.append(worker(app, queue, tmp_path, "hang", env=env))
    marks = tmp_path / "marks"
    marks.mkdir()
    values: list[object] = [0, 1, [HANG, 2], 3]
    job = rigged_job(app, values, 2, queue, marks=marks, limits=(2, 1))
    outcome = wait(app, job, submit(app, job, 600), timeout=60)
    assert outcome["results"] == [0, 2, None, 6]
    [error] = outcome["errors"]
    assert error["index"] == 2 and "hard time limit" in error["error"]
    # The batch went back to the queue at each hard limit and ran again at once, until the
    # item had hit the limit in MAX_KILLS counted reruns; the item after it ran once, at the end.
    assert runs_of(marks) == {"0": 1, "1": 1, "['hang',2]": MAX_KILLS + 1, "3": 1}


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
    assert worker.log_path is not None
    log = Path(worker.log_path)
    ran = f"Task fanout.collect[{job.job_id}] succeeded"
    assert log.read_text().count(ran) == 1
    files = [out / "manifest.json", out / "contact-sheet.png"]
    before = [(f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    # The callback's message delivered again: same task id, same parts.
    part = {"start": 0, "results": outcome["results"], "errors": outcome["errors"], "transient": 0}
    app.send_task(
        "fanout.collect", args=[[part]], kwargs={"job": job.signature.body.kwargs["job"]}, task_id=job.job_id
    )
    # Not .get(): that would return the first run's stored result at once.
    wait_until(lambda: log.read_text().count(ran) == 2, 30, "the callback's second run")
    again = callback_meta(app, job.job_id)
    assert again is not None and again["result"] == outcome  # the second run's own result
    after = [(f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    assert after == before, "the second run rewrote the manifest or the contact sheet"
    assert json.loads(before[0][0])["succeeded"] == outcome["total"] == 6


def wait_in_thread(
    app: Celery, job: Any, group_id: str, timeout: float
) -> tuple[threading.Thread, list[float], dict[str, Any]]:
    """Run ``wait`` in a thread, as the CLI would be waiting when a fault strikes.

    Returns the thread, the times progress moved, and where the ending goes
    (``"error"`` and ``"at"``, or ``"outcome"``).
    """
    moved: list[float] = []
    ending: dict[str, Any] = {}

    def run() -> None:
        try:
            ending["outcome"] = wait(
                app, job, group_id, timeout, progress=lambda done, _all: moved.append(time.monotonic())
            )
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            ending["error"] = exc
        ending["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, moved, ending


def test_workers_that_vanish_mid_run_are_reported_with_what_is_pending(
    tmp_path: Path, quiet_url: str, workers_started: list[LocalWorker]
) -> None:
    # A Redis of its own: no other worker answers there.
    app = app_for(quiet_url)
    queue = new_queue()
    local = worker(app, queue, tmp_path, "vanishing", env={"FANOUT_REDIS_URL": quiet_url})
    workers_started.append(local)
    values = list(range(20))
    job = rigged_job(app, values, 1, queue, seconds=1.0, limits=None)
    group_id = submit(app, job, 600)
    thread, moved, ending = wait_in_thread(app, job, group_id, timeout=90)
    wait_until(lambda: len(moved) >= 2, 30, "the first batches")  # the first call is 0 done
    kill_all(local)
    killed_at = time.monotonic()
    thread.join(60)
    assert not thread.is_alive(), "the wait should have ended long before its timeout"
    error = ending.get("error")
    assert isinstance(error, InfrastructureError), ending
    stopped_moving = moved[-1]
    assert STALL_S <= ending["at"] - stopped_moving <= STALL_REPORT_S, ending["at"] - stopped_moving
    assert ending["at"] - killed_at <= STALL_REPORT_S
    message = str(error)
    assert "no worker is running" in message and job.job_id in message
    assert "of 20 batches done" in message and "pending" in message


def test_a_wait_notices_when_redis_lost_the_run_between_two_polls(tmp_path: Path, quiet_url: str) -> None:
    # A restart without persistence that no poll saw: the state is simply gone.
    app = app_for(quiet_url)
    job = rigged_job(app, list(range(4)), 2, new_queue())
    group_id = submit(app, job, 600)
    app.backend.client.flushdb()
    flushed_at = time.monotonic()
    with pytest.raises(InfrastructureError) as info:
        wait(app, job, group_id, timeout=120)
    assert STALL_S <= time.monotonic() - flushed_at <= STALL_REPORT_S
    assert "without persistence" in str(info.value) and job.job_id in str(info.value)


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=bool(request.param)).start()
    yield server
    server.stop()


def cli_waiting(env: dict[str, str], job_id: str, timeout: float = 120) -> subprocess.Popen[str]:
    """``fanout status JOB_ID --wait --json`` in the background."""
    return subprocess.Popen(
        fanout_command("status", job_id, "--wait", "--json", "--timeout", str(timeout)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def polling(server: RedisServer) -> Callable[[], bool]:
    """Whether a client of ``server`` is in its wait loop: only the wait sends ZCARD (the test
    reads its progress with ``counted``)."""
    import redis

    def seen() -> bool:
        client = redis.Redis(host=server.bind, port=server.port)
        try:
            return any(c.get("cmd") == "zcard" for c in client.client_list())
        finally:
            client.close()

    return seen


@pytest.mark.parametrize(
    ("own_redis", "outage_s", "workers_late_s"),
    [
        (True, 5, 0),
        # Workers that come back 3 s after Redis does (a slower host, a longer reconnect): their
        # registrations expired in the outage, and the wait must give them its 10 s.
        (True, REDIS_GRACE_S - 8, 3),
    ],
    indirect=["own_redis"],
)
def test_redis_restart_with_aof_mid_chord_the_waiting_cli_rides_it_out(
    own_redis: RedisServer,
    outage_s: float,
    workers_late_s: float,
    tmp_path: Path,
    workers_started: list[LocalWorker],
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    env = {**QUICK, "FANOUT_REDIS_URL": own_redis.url}
    workers_started.append(worker(app, queue, tmp_path, "aof-a", env=env))
    workers_started.append(worker(app, queue, tmp_path, "aof-b", env=env))
    values = list(range(16))
    job = rigged_job(app, values, 1, queue, seconds=1.0)
    group_id = submit(app, job, 600)
    waiting = cli_waiting({**os.environ, "FANOUT_REDIS_URL": own_redis.url}, job.job_id)

    def signal_workers(signum: int) -> None:
        for local in workers_started:
            if local.process is not None and local.process.poll() is None:
                os.killpg(local.process.pid, signum)

    try:
        wait_until(lambda: counted(app, group_id) >= 2, 30, "the first batches")
        wait_until(polling(own_redis), 30, "the CLI to be waiting")
        own_redis.stop()
        down_at = time.monotonic()
        if workers_late_s:
            signal_workers(signal.SIGSTOP)
        time.sleep(outage_s)  # the outage: the fault itself, not a wait for a condition
        own_redis.start()
        assert time.monotonic() - down_at < REDIS_GRACE_S
        if workers_late_s:
            time.sleep(workers_late_s)  # the workers' delay: part of the fault
            signal_workers(signal.SIGCONT)
        out, err = waiting.communicate(timeout=120)
    finally:
        signal_workers(signal.SIGCONT)
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert_every_index_once(json.loads(out), values)


@pytest.mark.parametrize("own_redis", [True], indirect=True)
def test_the_waiting_cli_gives_up_on_redis_30_s_after_it_went_away(
    own_redis: RedisServer, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    env = {**QUICK, "FANOUT_REDIS_URL": own_redis.url}
    workers_started.append(worker(app, queue, tmp_path, "gone", env=env))
    job = rigged_job(app, list(range(60)), 1, queue, seconds=1.0)
    group_id = submit(app, job, 600)
    waiting = cli_waiting({**os.environ, "FANOUT_REDIS_URL": own_redis.url}, job.job_id)
    try:
        wait_until(lambda: counted(app, group_id) >= 1, 30, "the first batch")
        wait_until(polling(own_redis), 30, "the CLI to be waiting")
        own_redis.stop()
        down_at = time.monotonic()
        _, err = waiting.communicate(timeout=REDIS_GRACE_S + 30)
        gave_up_in = time.monotonic() - down_at
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 3, err
    assert "lost Redis" in err and job.job_id in err and "fanout status" in err
    assert REDIS_GRACE_S <= gave_up_in <= REDIS_GRACE_REPORT_S, gave_up_in


@pytest.mark.parametrize(
    ("own_redis", "outage_s", "bound_s"),
    [
        # Down long enough that the client's own reconnect retries (about 5 s at most) give up:
        # the wait knows Redis went away and checks the job's state as soon as it answers.
        (False, 8, LOST_STATE_REPORT_S),
        # A quick restart those retries hide: the state is found gone at the next stall check.
        (False, 0, STALL_REPORT_S),
    ],
    indirect=["own_redis"],
)
def test_redis_restart_without_persistence_ends_the_wait_with_exit_3(
    own_redis: RedisServer,
    outage_s: float,
    bound_s: float,
    tmp_path: Path,
    workers_started: list[LocalWorker],
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    env = {**QUICK, "FANOUT_REDIS_URL": own_redis.url}
    workers_started.append(worker(app, queue, tmp_path, "volatile", env=env))
    job = rigged_job(app, list(range(30)), 1, queue, seconds=1.0)
    group_id = submit(app, job, 600)
    waiting = cli_waiting({**os.environ, "FANOUT_REDIS_URL": own_redis.url}, job.job_id)
    try:
        wait_until(lambda: counted(app, group_id) >= 1, 30, "the first batch")
        wait_until(polling(own_redis), 30, "the CLI to be waiting")
        own_redis.stop()
        time.sleep(outage_s)  # the outage: the fault itself, not a wait for a condition
        own_redis.start()
        back_at = time.monotonic()
        _, err = waiting.communicate(timeout=60)
        reported_in = time.monotonic() - back_at
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 3, err
    assert "without persistence" in err and job.job_id in err
    assert reported_in <= bound_s, f"reported {reported_in:.1f} s after Redis answered again"
