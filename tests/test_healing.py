"""The fan-in that heals: batches whose messages Redis dropped are sent again and counted once.

The unit tests check the healer's decisions (workers/healing.py's Detector) and
how it rebuilds a batch; the system tests take messages out from under real
workers (the queue, kombu's unacked hash, the whole queue) and check that each
job completes with every index exactly once, within the bound docs/failures.md
states, whether or not a client waits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from orchestrator.follow import batches_done, callback_meta
from orchestrator.local import LocalWorker
from tests.conftest import fanout_command
from tests.faultkit import (
    QUICK,
    Built,
    assert_every_index_once,
    kill_all,
    new_queue,
    rigged_job,
    runs_of,
    send,
    wait_until,
)
from workers import keys
from workers.batches import batch_task_id
from workers.errors import InfrastructureError
from workers.healing import CONFIRM_S, INTERVAL_S, STALL_S, SWEEP_S, Detector, Recipe, missing_batches

# --- the healer's decisions, without Redis -------------------------------------------------------


def test_missing_batches_reads_redis_bit_order() -> None:
    # Redis's bit 0 is the most significant bit of the first byte.
    assert missing_batches(None, 3) == [0, 1, 2]
    assert missing_batches(b"\xa0", 4) == [1, 3]  # bits 0 and 2 set
    assert missing_batches(b"\xff\x80", 10) == [9]
    assert missing_batches(b"\xff\xff\xff", 10) == []


def test_a_batch_is_lost_only_when_missing_from_two_scans_confirm_s_apart() -> None:
    detector = Detector()
    # Given a job with batches 3 and 4 not done, and batch 4 in the queue
    assert detector.observe("j", [3, 4], 3, now=0.0)  # never scanned: due at once
    # When a scan finds batch 3 nowhere (and batch 4 in the queue), it is only a suspect...
    assert detector.lost("j", [3], now=0.0) == []
    # ...not looked at again before CONFIRM_S...
    assert not detector.observe("j", [3, 4], 3, now=CONFIRM_S - 0.1)
    assert detector.lost("j", [3], now=CONFIRM_S - 0.1) == []
    # Then lost once it has been missing for CONFIRM_S
    assert detector.observe("j", [3, 4], 3, now=CONFIRM_S)
    assert detector.lost("j", [3], now=CONFIRM_S) == [3]


def test_a_batch_found_again_is_no_longer_a_suspect() -> None:
    detector = Detector()
    detector.observe("j", [3], 4, now=0.0)
    assert detector.lost("j", [3], now=0.0) == []
    # It shows up (restored to the queue by kombu in between): the clock starts again.
    assert detector.lost("j", [], now=1.0) == []
    assert detector.lost("j", [3], now=CONFIRM_S + 0.5) == []
    assert detector.lost("j", [3], now=2 * CONFIRM_S + 1.0) == [3]


def test_a_moving_job_is_scanned_only_every_sweep_and_a_stalled_one_after_stall_s() -> None:
    detector = Detector()
    assert detector.observe("j", [1, 2, 3], 1, now=0.0)
    detector.lost("j", [], now=0.0)
    # Moving (one more batch done each second): not due until the sweep.
    assert not detector.observe("j", [2, 3], 2, now=1.0)
    assert not detector.observe("j", [3], 3, now=2.0)
    # Stalled since t=2: due once STALL_S have passed without a change, then every STALL_S.
    assert not detector.observe("j", [3], 3, now=2.0 + STALL_S - 0.1)
    assert detector.observe("j", [3], 3, now=2.0 + STALL_S)
    detector.lost("j", [], now=2.0 + STALL_S)
    assert not detector.observe("j", [3], 3, now=2.0 + 2 * STALL_S - 0.1)
    assert detector.observe("j", [3], 3, now=2.0 + 2 * STALL_S)
    # A job that keeps moving is still looked at every SWEEP_S.
    other = Detector()
    other.observe("k", list(range(100)), 0, now=0.0)
    other.lost("k", [], now=0.0)
    for t in range(1, int(SWEEP_S)):
        assert not other.observe("k", list(range(t, 100)), t, now=float(t))
    assert other.observe("k", list(range(int(SWEEP_S), 100)), int(SWEEP_S), now=SWEEP_S)


def test_a_long_queue_is_scanned_no_more_than_its_share_of_the_time() -> None:
    detector = Detector()
    detector.gap = 60.0  # the last scan took 1.2 s
    detector.observe("j", [1], 0, now=0.0)
    detector.lost("j", [], now=0.0)
    # Stalled and past the sweep, but not yet past the gap
    assert not detector.observe("j", [1], 0, now=SWEEP_S + STALL_S)
    assert detector.observe("j", [1], 0, now=60.0)


def test_a_batch_sent_again_is_not_sent_again_while_it_waits_in_the_queue() -> None:
    detector = Detector()
    detector.observe("j", [0], 0, now=0.0)
    detector.lost("j", [0], now=0.0)
    assert detector.lost("j", [0], now=CONFIRM_S) == [0]
    detector.resent("j", [0], now=CONFIRM_S)
    # The next scans catch it between the queue and a worker (a scan's moment): not again, yet.
    assert detector.lost("j", [0], now=CONFIRM_S + 1) == []
    assert detector.lost("j", [0], now=2 * CONFIRM_S + 2) == []


def test_a_recipe_rebuilds_each_batch_as_the_client_sent_it() -> None:
    record: dict[str, Any] = {
        "job_id": "j",
        "group_id": "g",
        "total": 10,
        "batch_size": 4,
        "batches": 3,
        "spec": {},
        "heal": {"task": "t", "queue": "q", "tail": [{"k": 1}], "callback": {"task": "fanout.collect"}},
    }
    kept = list(range(100, 110))
    in_redis = Recipe.from_record(record)
    assert in_redis is not None and in_redis.inputs == "redis"
    assert in_redis.items_of(2, kept) == [108, 109]
    by_range = Recipe.from_record({**record, "spec": {"where": "/r/j", "range": [50, 60]}})
    assert by_range is not None and by_range.items_of(1, None) == {"range": [54, 58]}
    by_file = Recipe.from_record({**record, "spec": {"where": "/r/j"}})
    assert by_file is not None
    assert by_file.items_of(2, None) == {"url": "/r/j/inputs/000000000008.json", "count": 2}
    # A record from before healing existed cannot be healed, and says so by having no recipe.
    assert Recipe.from_record({**record, "heal": None}) is None


def test_batch_task_ids_are_the_same_every_time_and_differ_between_batches() -> None:
    import uuid

    for job_id in ("job", str(uuid.uuid4())):
        assert batch_task_id(job_id, 3) == batch_task_id(job_id, 3)
        ids = {batch_task_id(job_id, i) for i in range(1000)} | {batch_task_id("other", 0), job_id}
        assert len(ids) == 1002
        assert all(uuid.UUID(i) for i in ids - {"job"})


# --- real workers, real Redis --------------------------------------------------------------------

system = pytest.mark.system

#: The bound docs/failures.md states: a lost batch is sent again within this long of its job's
#: last progress (STALL_S without progress, a scan, CONFIRM_S until the scan that confirms it,
#: a cycle for each, and a loaded machine's delays).
HEAL_AFTER_STALL_S = STALL_S + CONFIRM_S + 2 * INTERVAL_S + 3
#: ...and within this long of going missing, however the job moves (the sweep).
HEAL_AFTER_LOSS_S = SWEEP_S + CONFIRM_S + 2 * INTERVAL_S + 3


def take_message(client: redis.Redis, queue: str, group_id: str, index: int) -> bytes:
    """Remove batch ``index`` of group ``group_id``'s message from ``queue``, as a lost BRPOP would."""
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        if headers.get("group") == group_id and headers.get("group_index") == index:
            assert client.lrem(queue, 1, raw) == 1  # type: ignore[arg-type]
            return raw if isinstance(raw, bytes) else raw.encode()
    raise AssertionError(f"batch {index} of {group_id} is not queued")


def healed(client: redis.Redis, job_id: str) -> int:
    return int(client.get(keys.healed(job_id)) or 0)


@system
def test_a_batch_whose_message_redis_dropped_is_sent_again_and_counted_once(
    app: Celery, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    queue = new_queue()
    values = list(range(8))
    client = app.backend.client
    # Given a job of 8 one-item batches of 1 s each, on one worker process
    sent = send(app, rigged_job(app, values, 1, queue, seconds=1.0, marks=marks))
    group_id = sent.group_id
    start_worker(app, queue, "heal", env=QUICK, concurrency=1)
    wait_until(lambda: batches_done(app, group_id) >= 1, 30, "the first batch")
    # When Redis drops one of its queued messages (nobody will ever run it)
    take_message(client, queue, group_id, 5)
    # Then, with no client waiting, the job still completes...
    progress: list[float] = []  # when the count of finished batches last grew
    resent_at: list[float] = []
    last = [batches_done(app, group_id)]

    def watch() -> bool:
        now = time.monotonic()
        done = batches_done(app, group_id)
        if done > last[0]:
            last[0] = done
            progress.append(now)
        if not resent_at and healed(client, sent.job_id):
            resent_at.append(now)
        meta = callback_meta(app, sent.job_id)
        return meta is not None and meta["status"] == "SUCCESS"

    wait_until(watch, 90, "the job to complete", interval=0.05)
    outcome = sent.wait(timeout=10)
    # ...with every index exactly once, the lost batch sent again once and run once
    assert_every_index_once(outcome, values)
    assert healed(client, sent.job_id) == 1
    assert runs_of(marks) == {str(v): 1 for v in values}
    # ...within the stated bound of the job's last progress before the healing.
    assert resent_at, "the healer never sent the batch again"
    stalled_at = max(t for t in progress if t <= resent_at[0])
    assert resent_at[0] - stalled_at <= HEAL_AFTER_STALL_S


@system
def test_a_message_lost_from_unacked_with_its_worker_is_sent_again(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    queue = new_queue()
    values = list(range(6))
    client = app.backend.client
    # Given two workers, the first holding a batch it has started (in kombu's unacked hash)
    sent = send(app, rigged_job(app, values, 1, queue, seconds=4.0, limits=(20, 15)))
    group_id = sent.group_id
    doomed = start_worker(app, queue, "doomed", env=QUICK, concurrency=1)
    wait_until(lambda: client.hlen("unacked") >= 1, 30, "a batch to be reserved")
    # When its message vanishes from unacked (kombu's BRPOP window, a failover) and the worker
    # dies with it: no restore can ever bring that batch back
    for tag, raw in client.hgetall("unacked").items():
        if json.loads(raw)[0]["headers"]["group"] == group_id:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    kill_all(doomed)
    start_worker(app, queue, "survivor", env=QUICK, concurrency=2)
    # Then the job completes on the other worker, every index once, the lost batch healed
    outcome = sent.wait(timeout=120)
    assert_every_index_once(outcome, values)
    assert healed(client, sent.job_id) >= 1


@system
def test_a_batch_of_a_job_sent_by_reference_is_sent_again_from_its_input_file(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    from orchestrator.plan import prepare
    from orchestrator.send import spec_of
    from tests import userjobs
    from workers import results

    client = app.backend.client
    # Given a user's job sent by reference (its items in files of the results location)
    values = [0.6 + k / 100 for k in range(8)]
    spec = replace(spec_of(userjobs.sleepy), results_root=str(tmp_path / "r"))
    sent = send(app, Built(prepare(spec, values, by_reference=True), 1))
    group_id = sent.group_id
    # When Redis drops one of its queued messages
    take_message(client, "fanout", group_id, 7)
    # Then the healer sends it again, naming the same file, and the job completes
    outcome = sent.wait(timeout=90)
    whole = results.materialize(outcome)
    assert whole["results"] == values and whole["failed"] == 0
    assert healed(client, sent.job_id) == 1


@system
def test_a_flushed_queue_is_sent_again_batch_by_batch(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    queue = new_queue()
    values = list(range(40))
    client = app.backend.client
    sent = send(app, rigged_job(app, values, 4, queue, seconds=0.2))
    group_id = sent.group_id
    start_worker(app, queue, "flush", env=QUICK, concurrency=1)
    wait_until(lambda: batches_done(app, group_id) >= 1, 30, "the first batch")
    # When an operator deletes the queue mid-job
    dropped = client.llen(queue)
    client.delete(queue)
    assert dropped >= 5
    # Then every dropped batch is sent again and the job completes, every index once
    outcome = sent.wait(timeout=120)
    assert_every_index_once(outcome, values)
    assert healed(client, sent.job_id) == dropped


@system
def test_a_lost_batch_whose_inputs_are_gone_ends_the_wait_with_exit_3(
    app: Celery, start_worker: Callable[..., LocalWorker], cli_env: dict[str, str]
) -> None:
    queue = new_queue()
    client = app.backend.client
    sent = send(app, rigged_job(app, list(range(6)), 1, queue, seconds=0.5))
    group_id = sent.group_id
    # Given a batch dropped by Redis and the job's kept inputs gone too
    take_message(client, queue, group_id, 4)
    assert client.delete(keys.inputs(sent.job_id)) == 1
    start_worker(app, queue, "gone", env=QUICK, concurrency=2)
    # When a client waits for the job
    started = time.monotonic()
    proc = subprocess.run(
        fanout_command("status", sent.job_id, "--wait", "--timeout", "120"),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    took = time.monotonic() - started
    # Then it exits 3, saying exactly that, long before its timeout
    assert proc.returncode == 3, proc.stderr
    assert "cannot complete" in proc.stderr and "inputs are no longer in Redis" in proc.stderr
    assert "batch 4" in proc.stderr
    # (the job runs out of other work in about 1.5 s; the client looks at the next stall check)
    assert took <= HEAL_AFTER_STALL_S + 14, took
    with pytest.raises(InfrastructureError, match="cannot complete"):
        sent.wait(timeout=30)


@system
def test_a_callback_never_sent_by_a_dead_reporter_is_sent_by_a_copy_of_one_batch(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    queue = new_queue()
    values = list(range(6))
    client = app.backend.client
    sent = send(app, rigged_job(app, values, 2, queue))
    group_id = sent.group_id
    # Given a chord whose last report counted the parts but sent no callback (as when the
    # worker reporting it dies in between): here the chord expects one part more...
    client.incr(app.backend.get_key_for_group(group_id, ".t"))
    start_worker(app, queue, "nocb", env=QUICK, concurrency=2)
    wait_until(lambda: batches_done(app, group_id) == 3, 30, "every batch to report")
    # ...until that is undone: complete, and nothing left to send the callback
    client.delete(app.backend.get_key_for_group(group_id, ".t"))
    # Then the healer sends one batch again, whose report sends the callback
    outcome = sent.wait(timeout=60)
    assert_every_index_once(outcome, values)
    assert healed(client, sent.job_id) == 1


@system
def test_a_callback_dropped_after_the_chord_sent_it_runs_the_job_again(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    queue, callbacks = new_queue(), new_queue()
    values = list(range(6))
    client = app.backend.client
    # Given a job whose callback goes to a queue no worker consumes yet
    sent = send(app, rigged_job(app, values, 2, queue, callback_queue=callbacks))
    start_worker(app, queue, "headers", env=QUICK, concurrency=2)
    wait_until(lambda: client.llen(callbacks) == 1, 30, "the chord to send its callback")
    # When Redis drops the callback (and the parts it carries)
    client.delete(callbacks)
    start_worker(app, callbacks, "callbacks", env=QUICK, concurrency=1)
    # Then the job runs again on a fresh chord and completes, every index once
    outcome = sent.wait(timeout=90)
    assert_every_index_once(outcome, values)
    assert healed(client, sent.job_id) == 3


@system
def test_a_cancel_that_dies_before_reporting_what_it_took_off_the_queue_is_finished_by_the_healer(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    from workers.fanin import CANCELLED
    from workers.healing import PURGE_GRACE_S
    from workers.purge import PURGE_LIMIT, PURGE_LUA

    queue = new_queue()
    values = list(range(8))
    client = app.backend.client
    sent = send(app, rigged_job(app, values, 1, queue, seconds=0.5))
    group_id = sent.group_id
    # Given a cancel that took the queued batches off the queue and died before reporting them
    # (its purge started PURGE_GRACE_S ago)
    client.set(keys.stop(group_id), CANCELLED)
    _, taken = client.eval(
        PURGE_LUA, 5, queue, keys.done(group_id), keys.purged(group_id, "dead"), keys.purges(group_id),
        app.backend.get_key_for_group(group_id, ".t"), group_id, PURGE_LIMIT, 600, "dead",
        time.time() - PURGE_GRACE_S,
    )  # fmt: skip
    assert len(taken) == len(values)
    # When a worker runs (there is nothing left in the queue for it)
    start_worker(app, queue, "purge", env=QUICK, concurrency=1)
    # Then its healer reports them, and the job ends cancelled, every item accounted for once
    outcome = sent.wait(timeout=60)
    assert outcome["total"] == len(values) and outcome["failed"] == len(values)
    assert [e["index"] for e in outcome["errors"]] == list(range(len(values)))
    assert {e["error"] for e in outcome["errors"]} == {CANCELLED}
    assert outcome.get("stopped") == CANCELLED
    assert client.hlen(keys.purges(group_id)) == 0


@system
@pytest.mark.timeout(480)
def test_soak_concurrent_jobs_with_kills_and_drops_all_complete(
    app: Celery, tmp_path: Path, start_worker: Callable[..., LocalWorker]
) -> None:
    """Rounds of concurrent jobs; in each, a worker or a pool process is killed and a message dropped."""
    rng = random.Random(17)
    queue = new_queue()
    client = app.backend.client
    env = {**QUICK, "FANOUT_VISIBILITY_TIMEOUT": "8"}
    live = [start_worker(app, queue, f"soak{i}", env=env, concurrency=2) for i in range(2)]
    incomplete, resent, twice = 0, 0, 0
    for round_number in range(3):
        jobs = []
        for k in range(6):
            values = rng.sample(range(1_000_000), rng.randrange(40, 120))
            marks = tmp_path / f"marks-{round_number}-{k}"
            marks.mkdir()
            sent = send(
                app, rigged_job(app, values, rng.choice([1, 5, 10]), queue, seconds=0.02, marks=marks)
            )
            jobs.append((sent, values, marks))
        time.sleep(0.5)
        # A message dropped, as kombu's BRPOP window or a failover drops one...
        group_id = jobs[rng.randrange(len(jobs))][0].group_id
        queued = [
            json.loads(raw)["headers"]["group_index"]
            for raw in client.lrange(queue, 0, -1)
            if json.loads(raw)["headers"].get("group") == group_id
        ]
        if queued:
            take_message(client, queue, group_id, rng.choice(queued))
        # ...and a worker or a pool process killed
        victim = live[round_number % 2]
        if round_number % 2 == 0 and victim.process is not None:
            kill_all(victim)
            replacement = start_worker(app, queue, f"soak-r{round_number}", env=env, concurrency=2)
            live[round_number % 2] = replacement
        else:
            children = subprocess.run(
                ["pgrep", "-P", str(victim.process.pid if victim.process else 0)],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            if children:
                os.kill(int(children[0]), signal.SIGKILL)
        round_started = time.monotonic()
        for sent, values, marks in jobs:
            try:
                outcome = sent.wait(timeout=180)
            except InfrastructureError:
                incomplete += 1
                continue
            assert_every_index_once(outcome, values)
            resent += healed(client, sent.job_id)
            twice += sum(1 for count in runs_of(marks).values() if count > 1)
        print(f"soak round {round_number}: {time.monotonic() - round_started:.1f} s")
    assert incomplete == 0
    print(f"soak: 18 jobs complete, {resent} batches sent again by the healer, {twice} items ran twice")
