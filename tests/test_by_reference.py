"""Jobs sent by reference: parts and outcome in a results location, Redis holding only state.

A low threshold (``FANOUT_BY_REFERENCE_ITEMS``) forces small jobs onto the path
big ones take, so every guarantee is checked here with real workers and a real
Redis: input order, each index once (a batch delivered twice, its part written
twice), kill -9 of a worker, a Redis restart with AOF, detach and status,
retry, and a results location that cannot be written (exit 2, nothing sent).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery

import fanout
from orchestrator.local import LocalWorker
from tests import userjobs
from tests.conftest import fanout_command
from tests.faultkit import (
    QUICK,
    RedisServer,
    app_for,
    assert_every_index_once,
    counted,
    deliver_first_batch_twice,
    log_of,
    new_queue,
    polling,
    quick_env,
    rigged_job,
    runs_of,
    send,
    wait_until,
)
from tests.faulty import KILL_ONCE
from workers import results
from workers.batches import batch_task_id
from workers.fanin import OutcomeDoc, Part
from workers.settings import get_settings

# --- the merge, without a broker --------------------------------------------------------------


def _part(start: int, values: list[int], failed: dict[int, str] | None = None) -> Part:
    failed = failed or {}
    return {
        "start": start,
        "results": [None if start + k in failed else v for k, v in enumerate(values)],
        "errors": [{"index": i, "input": i, "error": e} for i, e in sorted(failed.items())],
        "transient": 0,
    }


def test_a_batch_whose_part_was_written_twice_counts_once_and_a_gap_is_lost(tmp_path: Path) -> None:
    where = str(tmp_path / "job")
    first = results.write_part(where, _part(0, [0, 2, 4]))
    again = results.write_part(where, _part(0, [0, 2, 4]))  # the same batch, delivered twice
    many = {3 + k: "bad" for k in range(results.INLINE_ERRORS + 1)}  # errors kept in the file only
    big = results.write_part(where, _part(3, list(range(6, 6 + 2 * 40, 2))[:40], many))
    assert "errors" not in big and "errors" in first
    outcome = results.merge_refs([big, again, first], 50, "job", "double", where)
    assert outcome["total"] == 50 and outcome["ref"] == where
    # 33 failures from the file, 7 items (43..49) no part reported.
    assert (outcome["succeeded"], outcome["failed"]) == (50 - 33 - 7, 33 + 7)
    rows = list(results.iter_items(where))
    assert [i for i, _, _ in rows] == list(range(50))
    assert [v for _, v, _ in rows[:3]] == [0, 2, 4]
    assert [f["error"] for _, _, f in rows[3:36] if f] == ["bad"] * 33
    assert [v for _, v, _ in rows[36:43]] == list(range(6 + 2 * 33, 6 + 2 * 40, 2))
    assert all(f and f["error"] == results.LOST for _, _, f in rows[43:])
    assert [e["index"] for e in results.iter_errors(where)] == list(range(3, 36)) + list(range(43, 50))
    # One of the two files of the first batch was dropped with its reference.
    assert len(list((tmp_path / "job" / "parts").iterdir())) == 2
    assert results.materialize(outcome)["results"][:4] == [0, 2, 4, None]


def test_an_unwritable_results_location_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(fanout.ConfigError, match="a-file/results"):
        results.check_writable(str(blocker / "results"))


def test_job_directories_older_than_the_results_expire(tmp_path: Path) -> None:
    old, new = tmp_path / "old-job", tmp_path / "new-job"
    for directory in (old, new):
        (directory / "parts").mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert results.sweep(str(tmp_path), expires=3600) == 1
    assert not old.exists() and new.exists()


# --- with a real worker -----------------------------------------------------------------------


@pytest.fixture
def by_ref_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment with every job of 100 items or more sent by reference, under tmp_path."""
    return {**cli_env, "FANOUT_BY_REFERENCE_ITEMS": "100", "FANOUT_RESULTS_URL": str(tmp_path / "results")}


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fanout_command(*args), env=env, capture_output=True, text=True, timeout=timeout)


def _meta_size(client: redis.Redis, job_id: str) -> int:
    return int(client.strlen(f"celery-task-meta-{job_id}"))


@pytest.mark.system
def test_cli_double_by_reference_prints_in_input_order_and_redis_keeps_only_the_reference(
    by_ref_env: dict[str, str], worker: LocalWorker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    n = 20_000
    done = run_cli(by_ref_env, "double", "--range", str(n), "--batch-size", "700", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["results"] == [2 * i for i in range(n)]
    assert (doc["succeeded"], doc["failed"], doc["errors"]) == (n, 0, [])
    job_dir = tmp_path / "results" / doc["job_id"]
    assert len(list((job_dir / "parts").iterdir())) == -(-n // 700)
    assert _meta_size(redis_client, doc["job_id"]) < 1000  # the reference, not 20,000 values
    assert not list(redis_client.scan_iter("fanout:inputs:*" + doc["job_id"]))  # a range: no inputs kept
    text = run_cli(by_ref_env, "double", "--range", "300", "--batch-size", "64")
    assert text.returncode == 0, text.stderr
    assert text.stdout.split() == [str(2 * i) for i in range(300)]


@pytest.mark.system
def test_cli_no_wait_then_status_finds_a_job_kept_by_reference(
    by_ref_env: dict[str, str], worker: LocalWorker
) -> None:
    sent = run_cli(by_ref_env, "double", "--range", "3000", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.strip()
    waited = run_cli(by_ref_env, "status", job_id, "--wait", "--json", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["results"] == [2 * i for i in range(3000)]
    again = run_cli(by_ref_env, "status", job_id)
    assert again.returncode == 0 and again.stdout.split()[:3] == ["0", "2", "4"]


@pytest.mark.system
def test_an_unwritable_results_location_exits_2_naming_it_and_sends_nothing(
    by_ref_env: dict[str, str], worker: LocalWorker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    env = {**by_ref_env, "FANOUT_RESULTS_URL": str(blocker / "results")}
    jobs_before = set(redis_client.scan_iter("fanout:job:*"))
    done = run_cli(env, "double", "--range", "1000")
    assert done.returncode == 2, done.stderr
    assert "plain-file/results" in done.stderr and "not writable" in done.stderr
    assert set(redis_client.scan_iter("fanout:job:*")) == jobs_before
    assert redis_client.llen(get_settings().queue) == 0


@pytest.mark.system
def test_map_by_reference_keeps_order_failures_iterators_and_reduce(
    by_ref_here: Path, worker: LocalWorker
) -> None:
    items: list[object] = list(range(5000))
    bad = {7: "seven", 4321: 1.5}
    for index, value in bad.items():
        items[index] = value
    job = fanout.submit(userjobs.triple, items, batch_size=128, reduce=userjobs.total)
    outcome = job.wait(120)
    assert outcome.by_reference and (by_ref_here / job.id / "outcome.json").exists()
    expected = [None if i in bad else 3 * i for i in range(5000)]
    assert list(job.results()) == expected  # an iterator, in input order
    assert outcome.results == expected
    assert [(f.index, f.input) for f in outcome.errors] == sorted(bad.items())
    assert outcome.reduced == {"sum": sum(v for v in expected if v is not None), "failed": sorted(bad)}
    seen = dict(fanout.Job.attach(job.id).as_completed(60))
    assert sorted(seen) == list(range(5000))
    assert isinstance(seen[7], fanout.Failure) and seen[8] == 24
    # The items went by reference too (the client wrote them before sending), so retry finds them.
    assert (by_ref_here / job.id / "inputs").is_dir()


@pytest.mark.system
def test_retry_of_a_job_kept_by_reference_merges_in_input_order(
    by_ref_here: Path, worker: LocalWorker
) -> None:
    items: list[object] = list(range(400))
    items[5] = "five"
    first = fanout.submit(userjobs.triple, items, batch_size=64)
    assert first.wait(60).failed == 1
    again = first.retry_failed()
    outcome = again.wait(60)
    assert outcome.by_reference and outcome.failed == 1  # "five" fails again, in its place
    assert [f.index for f in outcome.errors] == [5]
    assert outcome.results == [None if i == 5 else 3 * i for i in range(400)]


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.system
def test_a_batch_delivered_twice_writes_its_part_twice_and_counts_once(
    app: Celery, tmp_path: Path, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    queue = new_queue()
    values = list(range(8))
    job = rigged_job(
        app, values, 2, queue, seconds=0.2, marks=marks, limits=None, results_root=tmp_path / "r"
    )
    sent = send(app, job)
    deliver_first_batch_twice(app, queue)
    start_worker(app, queue, "twice")
    outcome = sent.wait(timeout=60)
    assert_every_index_once(outcome, values, by_reference=True)
    assert runs_of(marks)["0"] == 2, "the copy should have run too"
    # Both runs wrote a part of their own (4 batches, 5 files); the outcome counted one.
    parts = sorted(p.name.split("-")[0] for p in (tmp_path / "r" / job.job_id / "parts").iterdir())
    assert parts.count(f"{0:012d}") == 2 and len(parts) == 5


@pytest.mark.system
def test_kill_9_of_a_pool_process_mid_batch_loses_nothing(
    app: Celery, tmp_path: Path, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    # SIGKILL of the process running a batch, once, half-way through it (as the OOM killer does).
    queue = new_queue()
    start_worker(app, queue, "oom", env=QUICK)
    values: list[object] = list(range(12))
    values[5] = [KILL_ONCE, 5, "item5"]
    outcome = send(app, rigged_job(app, values, 4, queue, marks=marks, results_root=tmp_path / "r")).wait(60)
    assert_every_index_once(outcome, list(range(12)), by_reference=True)
    assert (marks / "['once',5,'item5']").exists(), "the item never killed its process"


@pytest.mark.system
@pytest.mark.parametrize("own_redis", [True], indirect=True)
def test_redis_restart_with_aof_mid_run_the_waiting_client_rides_it_out(
    own_redis: RedisServer, tmp_path: Path, start_worker: Callable[..., LocalWorker]
) -> None:
    app = app_for(own_redis.url)
    queue = new_queue()
    start_worker(app, queue, "aof", env=quick_env(own_redis.url))
    values = list(range(16))
    sent = send(app, rigged_job(app, values, 1, queue, seconds=0.5, results_root=tmp_path / "r"))
    # Given a client already waiting for the job, mid-run
    waiting = sent.waiting(timeout=120)
    wait_until(lambda: counted(app, sent.group_id) >= 2, 30, "the first batches")
    wait_until(polling(own_redis), 30, "the client to be waiting")
    # When Redis goes away under it and comes back (AOF: nothing acknowledged is lost)
    assert waiting.ended_at is None, "the wait ended before the outage"
    own_redis.stop()
    time.sleep(2)  # the outage: the fault itself, not a wait for a condition
    own_redis.start()
    back_at = time.monotonic()
    # Then that same wait ends after the restart with every index once, read from the results location
    assert waiting.ended(120) > back_at
    assert waiting.error is None, waiting.error
    assert_every_index_once(waiting.outcome, values, by_reference=True)


@pytest.mark.system
def test_results_by_reference_on_s3(
    cli_env: dict[str, str], s3_env: dict[str, str], worker: LocalWorker
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="fanout-results")
    env = {
        **cli_env,
        **s3_env,
        "FANOUT_BY_REFERENCE_ITEMS": "100",
        "FANOUT_RESULTS_URL": "s3://fanout-results/jobs",
    }
    items = "".join(json.dumps({"x": i}) + "\n" for i in range(1000))
    done = subprocess.run(
        fanout_command(
            "map", "tests.userjobs:scale", "--input", "-", "--kwargs", '{"factor": 2}', "--batch-size", "300"
        ),
        env=env, input=items, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [{"index": i, "result": 2.0 * i} for i in range(1000)]
    job_id = done.stderr.rsplit("job ", 1)[1].split()[0].strip()
    stored = client.list_objects_v2(Bucket="fanout-results", Prefix=f"jobs/{job_id}/")
    names = {item["Key"].split("/", 2)[2].split("/")[0] for item in stored.get("Contents", [])}
    assert {"parts", "inputs", "outcome.json", "errors.jsonl"} <= names


@pytest.mark.system
def test_resize_by_reference_keeps_its_results_next_to_the_outputs(
    cli_env: dict[str, str], photos: Path, tmp_path: Path, worker: LocalWorker
) -> None:
    out = tmp_path / "small"
    env = {**cli_env, "FANOUT_BY_REFERENCE_ITEMS": "2"}
    env.pop("FANOUT_RESULTS_URL", None)
    done = run_cli(env, "resize", str(photos), "--out", str(out), "--max-side", "64", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["succeeded"] == 6 and [r["source"] for r in doc["results"]] == sorted(
        str(p) for p in photos.iterdir()
    )
    assert (out / ".fanout-results" / doc["job_id"] / "outcome.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["succeeded"] == manifest["images"] == 6


def test_outcome_results_of_a_huge_job_is_refused_in_favour_of_the_iterator() -> None:
    from orchestrator.jobs import MAX_RESULTS_LIST

    data: OutcomeDoc = {
        "job_id": "j", "task": "t", "total": MAX_RESULTS_LIST + 1, "succeeded": 0, "failed": 0,
        "results": [], "errors": [], "ref": "/nowhere",
    }  # fmt: skip
    with pytest.raises(fanout.ResultsTooLarge, match="iter_results"):
        _ = fanout.Outcome(data).results


def test_a_retry_merges_two_outcomes_kept_by_reference_a_part_at_a_time(tmp_path: Path) -> None:
    from workers.fanin import merge_retry

    old_dir, new_dir = str(tmp_path / "old"), str(tmp_path / "new")
    parts = [_part(0, [0, 2, 4, 6], {1: "x", 3: "y"}), _part(4, [8, 10, 12, 14], {6: "z"})]
    previous = results.merge_refs(
        [results.write_part(old_dir, p) for p in parts], 8, "old", "double", old_dir
    )
    indexes = [1, 3, 6]
    again_part = _part(0, [2, 6, 12], {1: "still y"})  # item 1 of the retry is index 3
    again = results.merge_refs([results.write_part(new_dir, again_part)], 3, "new", "double", new_dir)
    # (before the merge: it writes the merged outcome over the retry's own, in the same directory)
    expected = merge_retry(results.materialize(previous), results.materialize(again), indexes, "new")
    merged = results.merge_retry_refs(previous, again, indexes, "new", new_dir)
    assert results.materialize(merged)["results"] == expected["results"] == [0, 2, 4, None, 8, 10, 12, 14]
    assert list(results.iter_errors(new_dir)) == expected["errors"]
    assert (merged["failed"], merged["retry_of"]) == (1, "old")


@pytest.mark.system
def test_cancel_of_a_job_kept_by_reference_reports_its_queued_batches_by_reference(
    by_ref_here: Path, worker: LocalWorker, redis_client: redis.Redis
) -> None:
    job = fanout.submit(userjobs.sleepy, [0.05] * 2000, batch_size=10)
    wait_until(lambda: job.progress().batches_done >= 1, 60, "the first batch")
    job.cancel()  # the queued batches are taken off the queue, their parts written as files
    outcome = job.wait(timeout=60)
    assert outcome.by_reference and outcome.data.get("stopped") == "cancelled"
    done = [i for i, r in enumerate(outcome.results) if r is not None]
    assert 0 < len(done) < 2000 and all(outcome.results[i] == 0.05 for i in done)
    assert {f.error for f in outcome.errors} == {"cancelled"}
    assert len(done) + len(outcome.errors) == 2000
    wait_until(lambda: redis_client.llen(get_settings().queue) == 0, 10, "the queue to empty")
    # The purge took most batches off the queue (the worker never received them) and wrote
    # them as part files in the results location, as a worker writes a batch it ran: one file
    # per run of consecutive batches, every item of it cancelled, as one line however many
    # items; which is where the outcome read them from.
    received = log_of(worker)
    purged = [index for index in range(200) if batch_task_id(job.id, index) not in received]
    assert len(purged) > 150, f"the purge took {len(purged)} of 200 batches off the queue"
    parts = [json.loads(path.read_text()) for path in (by_ref_here / job.id / "parts").iterdir()]
    runs = [part for part in parts if any("count" in e for e in part["errors"])]
    assert runs, "no part file of a purge"
    covered = set()
    for part in runs:
        [run] = part["errors"]
        first, count = part["start"], len(part["results"])
        assert run == {"index": first, "count": count, "input": None, "error": "cancelled"}, run
        covered |= set(range(first // 10, (first + count) // 10))
    assert set(purged) <= covered
    failed = {f.index for f in outcome.errors}
    assert all(set(range(10 * index, 10 * index + 10)) <= failed for index in purged)
