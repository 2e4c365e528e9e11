"""A stopped job's queued batches leave the queue at any size: a cancel past one purge step, a
job sent by reference, and a failure budget's stop; with real workers on a real Redis."""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from celery import Celery

from orchestrator.discovery import list_workers
from orchestrator.local import LocalWorker
from orchestrator.plan import prepare
from orchestrator.send import spec_of
from tests import userjobs
from tests.faultkit import QUICK, Built, counted, double_job, new_queue, rigged_job, send, wait_until, worker
from workers import keys, purge, results

pytestmark = pytest.mark.system


def queued_of(client: redis.Redis, queue: str, group_id: str) -> int:
    """How many header batches of chord group ``group_id`` wait in ``queue`` (not its callback)."""
    headers = (json.loads(raw)["headers"] for raw in client.lrange(queue, 0, -1))
    return sum(h.get("group") == group_id and h.get("group_index") is not None for h in headers)


def test_a_cancel_past_one_purge_step_takes_every_queued_batch_keeps_the_count_and_ends_the_job(
    app: Celery,
    worker: LocalWorker,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a job sent by reference whose queue is many purge steps long (the step shrunk to 500)
    monkeypatch.setattr(purge, "PURGE_LIMIT", 500)
    n = 6000
    spec = replace(spec_of(userjobs.sleepy), results_root=str(tmp_path))
    job = send(app, Built(prepare(spec, [0.02] * n, by_reference=True), 1)).job
    wait_until(lambda: job.progress().batches_done >= 20, 60, "the first batches")
    assert queued_of(redis_client, "fanout", job.group_id) > 10 * purge.PURGE_LIMIT
    before = job.progress().batches_done
    listed: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # the worker stays listed all along (its main thread is never held up)
        while True:
            listed.append(len(list_workers(app)))
            if stop.wait(0.5):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # When it is cancelled
        job.cancel()
        # Then none of its batches is left in the queue, and the count it had is kept
        assert queued_of(redis_client, "fanout", job.group_id) == 0
        assert job.progress().batches_done >= before
        outcome = job.wait(timeout=90)
    finally:
        stop.set()
        watcher.join(5)
    # ...and the job ends cancelled, every item once: done with its result, or cancelled
    assert outcome.data.get("stopped") == "cancelled" and outcome.by_reference
    whole = results.materialize(outcome.data)
    failed = {e["index"] for e in whole["errors"]}
    assert {e["error"] for e in whole["errors"]} == {"cancelled"}
    assert all((whole["results"][i] is None) == (i in failed) for i in range(n))
    assert before <= n - len(failed) < n
    assert listed and min(listed) >= 1, f"the worker was not listed at some point: {listed}"
    assert job.progress().state == "SUCCESS"


def test_a_failure_budget_stop_takes_the_jobs_queued_batches_off_the_queue(
    app: Celery, worker: LocalWorker
) -> None:
    # Given a job of 3,003 one-item batches whose first three fail, with a budget of 2 failures
    client = app.backend.client
    values = [1, 3, 5] + [2] * 3000
    sent = send(app, Built(prepare(spec_of(userjobs.odd_fails, kwargs={"seconds": 0.01}), values), 1), 2)
    group_id = sent.group_id
    # When the workers take no more messages once they have the first few, and the third
    # failure stops the job
    app.control.cancel_consumer("fanout", reply=True, timeout=5)
    try:
        wait_until(lambda: client.exists(keys.stop(group_id)), 30, "the failure budget to stop the job")
        # Then the queued batches are taken off the queue all the same (by the workers' healer)
        # and every batch is counted
        wait_until(lambda: queued_of(client, "fanout", group_id) == 0, 30, "the queued batches to go")
        wait_until(lambda: counted(app, group_id) == len(values), 30, "every batch to be counted")
    finally:
        app.control.add_consumer("fanout", reply=True, timeout=5)
    # ...and the job ends once its callback can run, every item accounted for once
    outcome = sent.wait(timeout=60)
    assert outcome["stopped"].startswith("failure budget exceeded: 3 of 3003 items failed")
    not_run = [e for e in outcome["errors"] if e["error"] == outcome["stopped"]]
    assert len(not_run) > 1000  # taken off the queue, since no worker took them
    assert outcome["succeeded"] + outcome["failed"] == len(values) == outcome["total"]


def test_status_keeps_the_count_once_the_chord_has_joined_and_the_fan_in_has_yet_to_run(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    # Given a job whose batches are all done, and whose callback waits on a queue no worker takes
    queue, callbacks = new_queue(), new_queue()
    client = app.backend.client
    sent = send(app, rigged_job(app, list(range(40)), 2, queue, callback_queue=callbacks))
    group_id = sent.group_id
    workers_started.append(worker(app, queue, tmp_path, "headers", env=QUICK, concurrency=2))
    wait_until(lambda: client.llen(callbacks) == 1, 60, "the chord to send its callback")
    # When its status is read, the chord's join gone with the callback
    status = sent.job.status()
    # Then it shows every batch done, not none
    assert status.state == "running" and status.batches_done == sent.job.batches == 20
    assert counted(app, group_id) == sent.job.batches
    client.delete(callbacks)


def test_a_cancel_leaving_millions_of_items_not_run_ends_cancelled_with_every_item_counted(
    app: Celery, worker: LocalWorker
) -> None:
    # Given a job sent by reference of 3,000,000 items in 300 batches, none of them taken yet
    client = app.backend.client
    app.control.cancel_consumer("fanout", reply=True, timeout=5)
    try:
        sent = send(app, double_job(range(3_000_000), 10_000))
        assert queued_of(client, "fanout", sent.group_id) == 300
        # When it is cancelled: every batch is taken off the queue and reported at once
        sent.job.cancel()
        assert queued_of(client, "fanout", sent.group_id) == 0
    finally:
        app.control.add_consumer("fanout", reply=True, timeout=5)
    # Then its fan-in (a line per run of cancelled batches, not one per item) ends within its
    # time limit: the job is CANCELLED, every item counted once, as cancelled
    outcome = sent.job.wait(timeout=90)
    assert outcome.data["stopped"] == "cancelled" and outcome.by_reference
    assert (outcome.total, outcome.succeeded, outcome.failed) == (3_000_000, 0, 3_000_000)
    assert results.failed_for(outcome.data, "cancelled") == 3_000_000
    assert sent.job.status().shown_state == "CANCELLED"
    # ...and a reader still sees one failure per item, in order
    head = list(itertools.islice(results.outcome_errors(outcome.data), 3))
    assert head == [{"index": i, "input": None, "error": "cancelled"} for i in range(3)]
