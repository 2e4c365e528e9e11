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
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from orchestrator.canvas import callback_job
from orchestrator.follow import callback_meta
from orchestrator.local import LocalWorker
from tests.faultkit import (
    QUICK,
    RedisServer,
    app_for,
    assert_every_index_once,
    busy,
    cli_waiting,
    counted,
    deliver_first_batch_twice,
    kill_all,
    log_of,
    new_queue,
    polling,
    quick_env,
    resize_job,
    rigged_job,
    runs_of,
    send,
    wait_until,
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


@pytest.mark.timeout(LOST_WORKER_BOUND_S + 180)  # two worker starts, then the bound from the kill
def test_kill_9_of_a_worker_with_default_settings_loses_nothing_within_two_minutes(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    queue = new_queue()
    doomed = start_worker(app, queue, "doomed")
    survivor = start_worker(app, queue, "survivor")
    values = list(range(12))
    sent = send(app, rigged_job(app, values, 1, queue, seconds=4, limits=None))
    in_flight = busy(app, doomed)
    killed_at = time.monotonic()
    kill_all(doomed)  # its pool too: only redelivery can bring that work back
    outcome = sent.wait(timeout=LOST_WORKER_BOUND_S + 60)
    recovered_in = time.monotonic() - killed_at
    assert_every_index_once(outcome, values)
    survivor_log = log_of(survivor)
    assert any(task_id in survivor_log for task_id in in_flight), "the lost batches were not redelivered"
    # The bound as stated, from the kill: visibility timeout, one sweep, one batch.
    assert recovered_in < LOST_WORKER_BOUND_S, f"completed {recovered_in:.0f} s after the kill"
    settings = Settings.from_env({})
    assert recovered_in > settings.visibility_timeout, "only redelivery should bring the lost work back"


def test_sigkill_of_a_pool_process_reruns_its_batch_once_within_seconds(
    app: Celery, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    # The way the OOM killer ends a pool process: SIGKILL, once, in the middle of a batch.
    # A 600 s visibility timeout and the default 30 s time limit: neither redelivery nor
    # the time limit's requeue can bring the batch back within the bound, only the pool's
    # noticing its lost process.
    queue = new_queue()
    env = {**NO_REDELIVERY, "FANOUT_TASK_TIME_LIMIT": "30"}
    start_worker(app, queue, "oom", env=env)
    values: list[object] = list(range(8))
    values[5] = [KILL_ONCE, 5, "item5"]
    outcome = send(app, rigged_job(app, values, 4, queue, marks=marks, limits=None)).wait(timeout=60)
    done_at = time.time()
    assert_every_index_once(outcome, list(range(8)))
    killed = marks / "['once',5,'item5']"  # made by the item just before it kills its process
    assert killed.exists(), "the item never killed its process"
    assert done_at - killed.stat().st_mtime <= POOL_LOSS_BOUND_S
    # One rerun of the killed batch (items 4-7), item by item; the other batch ran once.
    runs = runs_of(marks)
    assert runs == {"0": 1, "1": 1, "2": 1, "3": 1, "4": 2, "['kill-once',5,'item5']": 2, "6": 1, "7": 1}


def test_a_poison_item_is_failed_after_a_capped_number_of_runs_and_the_rest_completes(
    app: Celery, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    queue = new_queue()
    local = start_worker(app, queue, "poison", env=QUICK)
    values: list[object] = list(range(10))
    values[6] = [KILL, 6]
    outcome = send(app, rigged_job(app, values, 4, queue, marks=marks)).wait(timeout=60)
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
    app: Celery, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    # With a 600 s visibility timeout, only the immediate requeue can rerun the batch.
    queue = new_queue()
    env = {**NO_REDELIVERY, "FANOUT_TASK_TIME_LIMIT": "2"}
    start_worker(app, queue, "hang", env=env)
    values: list[object] = [0, 1, [HANG, 2], 3]
    outcome = send(app, rigged_job(app, values, 2, queue, marks=marks, limits=(2, 1))).wait(timeout=60)
    assert outcome["results"] == [0, 2, None, 6]
    [error] = outcome["errors"]
    assert error["index"] == 2 and "hard time limit" in error["error"]
    # The batch went back to the queue at each hard limit and ran again at once, until the
    # item had hit the limit in MAX_KILLS counted reruns; the item after it ran once, at the end.
    assert runs_of(marks) == {"0": 1, "1": 1, "['hang',2]": MAX_KILLS + 1, "3": 1}


def test_warm_shutdown_of_a_busy_worker_loses_nothing(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    # Default settings: a message lost at shutdown would take 75 s to come back,
    # longer than this test waits, so completing proves nothing was dropped.
    queue = new_queue()
    leaving = start_worker(app, queue, "leaving")
    start_worker(app, queue, "staying")
    values = list(range(12))
    sent = send(app, rigged_job(app, values, 1, queue, seconds=3, limits=None))
    running = busy(app, leaving)
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    outcome = sent.wait(timeout=50)
    assert_every_index_once(outcome, values)
    assert leaving.process.wait(30) == 0, "warm shutdown should end cleanly"
    leaving_log = log_of(leaving)
    assert all(f"{task_id}] succeeded" in leaving_log for task_id in running), "running tasks should finish"


def test_a_batch_delivered_twice_is_counted_once(
    app: Celery, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    queue = new_queue()
    values = list(range(8))
    sent = send(app, rigged_job(app, values, 2, queue, seconds=0.5, marks=marks, limits=None))
    deliver_first_batch_twice(app, queue)
    start_worker(app, queue, "twice")
    outcome = sent.wait(timeout=60)
    # Counted twice, the chord would fire one part early and report a lost batch.
    assert_every_index_once(outcome, values)
    assert runs_of(marks) == {"0": 2, "1": 2, **{str(v): 1 for v in values[2:]}}, (
        "the copy should have run too"
    )


def test_a_callback_run_twice_writes_the_manifest_once(
    app: Celery, worker: LocalWorker, photos: Path, tmp_path: Path
) -> None:
    from orchestrator.inputs import plan_images

    out = tmp_path / "out"
    job = resize_job(plan_images([photos], out).pairs, 64, out, batch_size=2)
    outcome = send(app, job).wait(timeout=60)
    ran = f"Task fanout.collect[{job.job_id}] succeeded"
    assert log_of(worker).count(ran) == 1
    files = [out / "manifest.json", out / "contact-sheet.jpg"]
    before = [(f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    # The callback's message delivered again: same task id, same parts.
    part = {"start": 0, "results": outcome["results"], "errors": outcome["errors"], "transient": 0}
    app.send_task("fanout.collect", args=[[part]], kwargs={"job": callback_job(job.plan)}, task_id=job.job_id)
    # Not .get(): that would return the first run's stored result at once.
    wait_until(lambda: log_of(worker).count(ran) == 2, 30, "the callback's second run")
    again = callback_meta(app, job.job_id)
    assert again is not None and again["result"] == outcome  # the second run's own result
    after = [(f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    assert after == before, "the second run rewrote the manifest or the contact sheet"
    assert json.loads(before[0][0])["succeeded"] == outcome["total"] == 6


def test_workers_that_vanish_mid_run_are_reported_with_what_is_pending(
    quiet_url: str, start_worker: Callable[..., LocalWorker]
) -> None:
    # A Redis of its own: no other worker answers there.
    app = app_for(quiet_url)
    queue = new_queue()
    local = start_worker(app, queue, "vanishing", env={"FANOUT_REDIS_URL": quiet_url})
    values = list(range(20))
    sent = send(app, rigged_job(app, values, 1, queue, seconds=1.0, limits=None))
    waiting = sent.waiting(timeout=90)
    wait_until(lambda: len(waiting.moved) >= 2, 30, "the first batches")  # the first call is 0 done
    kill_all(local)
    killed_at = time.monotonic()
    ended_at = waiting.ended(60)  # long before its timeout
    error = waiting.error
    assert isinstance(error, InfrastructureError), waiting.outcome
    stopped_moving = waiting.moved[-1]
    assert STALL_S <= ended_at - stopped_moving <= STALL_REPORT_S, ended_at - stopped_moving
    assert ended_at - killed_at <= STALL_REPORT_S
    message = str(error)
    assert "no worker is running" in message and sent.job_id in message
    assert "of 20 batches done" in message and "pending" in message


def test_a_wait_notices_when_redis_lost_the_run_between_two_polls(quiet_url: str) -> None:
    # A restart without persistence that no poll saw: the state is simply gone.
    app = app_for(quiet_url)
    sent = send(app, rigged_job(app, list(range(4)), 2, new_queue()))
    app.backend.client.flushdb()
    flushed_at = time.monotonic()
    with pytest.raises(InfrastructureError) as info:
        sent.wait(timeout=120)
    assert STALL_S <= time.monotonic() - flushed_at <= STALL_REPORT_S
    assert "without persistence" in str(info.value) and sent.job_id in str(info.value)


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
    start_worker: Callable[..., LocalWorker],
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    both = [start_worker(app, queue, name, env=quick_env(own_redis.url)) for name in ("aof-a", "aof-b")]
    values = list(range(16))
    sent = send(app, rigged_job(app, values, 1, queue, seconds=1.0))
    waiting = cli_waiting(own_redis.url, sent.job_id)

    def signal_workers(signum: int) -> None:
        for local in both:
            if local.process is not None and local.process.poll() is None:
                os.killpg(local.process.pid, signum)

    try:
        wait_until(lambda: counted(app, sent.group_id) >= 2, 30, "the first batches")
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
    own_redis: RedisServer, start_worker: Callable[..., LocalWorker]
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    start_worker(app, queue, "gone", env=quick_env(own_redis.url))
    sent = send(app, rigged_job(app, list(range(60)), 1, queue, seconds=1.0))
    waiting = cli_waiting(own_redis.url, sent.job_id)
    try:
        wait_until(lambda: counted(app, sent.group_id) >= 1, 30, "the first batch")
        wait_until(polling(own_redis), 30, "the CLI to be waiting")
        own_redis.stop()
        down_at = time.monotonic()
        _, err = waiting.communicate(timeout=REDIS_GRACE_S + 30)
        gave_up_in = time.monotonic() - down_at
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 3, err
    assert "lost Redis" in err and sent.job_id in err and "fanout status" in err
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
    start_worker: Callable[..., LocalWorker],
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    start_worker(app, queue, "volatile", env=quick_env(own_redis.url))
    sent = send(app, rigged_job(app, list(range(30)), 1, queue, seconds=1.0))
    waiting = cli_waiting(own_redis.url, sent.job_id)
    try:
        wait_until(lambda: counted(app, sent.group_id) >= 1, 30, "the first batch")
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
    assert "without persistence" in err and sent.job_id in err
    assert reported_in <= bound_s, f"reported {reported_in:.1f} s after Redis answered again"
