"""Stop, retry, resume: cancel, Ctrl-C, a failure budget, retrying the failed items, skipping
finished work, and a queue of fanout's own; all with real workers on a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

import fanout
from orchestrator.local import LocalWorker
from orchestrator.samples import make_photo
from tests import userjobs
from tests.conftest import TEST_REDIS_URL, fanout_command
from tests.faultkit import wait_until

pytestmark = pytest.mark.system

QUEUE = "fanout"


def queue_is_empty(client: redis.Redis) -> bool:
    """Nothing of fanout's waits in its queue, nor is held unacknowledged by a worker."""
    return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fanout_command(*args), env=env, capture_output=True, text=True, timeout=120, input=stdin
    )


@pytest.mark.parametrize("batch_size", ["auto", 1])
def test_cancel_of_10000_queued_slow_items_ends_the_job_and_empties_the_queue(
    worker: LocalWorker, redis_client: redis.Redis, batch_size: fanout.BatchSize
) -> None:
    # With one item per batch, 10,000 queued messages: taken off the queue, not drained by the workers.
    # How long it takes is a benchmark's to say (`python -m bench.cancel`), not a test's.
    longest = 0.05
    job = fanout.submit(userjobs.sleepy, [longest] * 10_000, batch_size=batch_size)
    wait_until(lambda: job.progress().batches_done >= 1, 60, "the first batch")
    job.cancel()
    outcome = job.wait(timeout=60)
    assert outcome.data.get("stopped") == "cancelled"
    done = [i for i, r in enumerate(outcome.results) if r is not None]
    assert all(outcome.results[i] == longest for i in done)
    assert {f.error for f in outcome.errors} == {"cancelled"}
    assert len(done) + len(outcome.errors) == 10_000
    assert 0 < len(done) < 10_000
    wait_until(lambda: queue_is_empty(redis_client), 10, "the queue to empty")
    assert job.progress().stopped == "cancelled"


def test_cancel_terminate_interrupts_the_running_items(worker: LocalWorker) -> None:
    job = fanout.submit(userjobs.sleepy, [30.0] * 4, batch_size=1)
    wait_until(lambda: len(active_batches(worker)) == 2, 30, "both pool processes to be busy")
    cancelled_at = time.monotonic()
    job.cancel(terminate=True)
    outcome = job.wait(timeout=30)
    assert time.monotonic() - cancelled_at < 5, "the running items were not interrupted"
    assert outcome.results == [None] * 4
    assert [f.error for f in outcome.errors] == ["cancelled"] * 4


def active_batches(worker: LocalWorker) -> list[object]:
    replies = worker.app.control.inspect([worker.hostname], timeout=1).active() or {}
    return list(replies.get(worker.hostname, []))


def test_cancel_from_the_cli_on_a_job_sent_with_no_wait(cli_env: dict[str, str], worker: LocalWorker) -> None:
    items = "".join(json.dumps(0.05) + "\n" for _ in range(2000))
    sent = run_cli(cli_env, "map", "tests.userjobs:sleepy", "--input", "-", "--no-wait", stdin=items)
    job_id = sent.stdout.strip()
    cancelled = run_cli(cli_env, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert (
        cancelled.stdout.startswith(f"job {job_id}: ")
        and "cancelled, 0 failed (cancelled)" in cancelled.stdout
    )
    shown = run_cli(cli_env, "status", job_id)
    assert shown.returncode == 1  # cancelled items are failed items
    assert ": CANCELLED (" in shown.stderr and "items not run)" in shown.stderr


def test_ctrl_c_on_a_waiting_run_cancels_the_job_and_exits_130(
    cli_env: dict[str, str], worker: LocalWorker, redis_client: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(0.05) + "\n" for _ in range(4000)))
    jobs_before = len(redis_client.keys("fanout:job:*"))
    proc = subprocess.Popen(
        fanout_command("map", "tests.userjobs:sleepy", "--input", str(source), "--batch-size", "1"),
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Sent (its record is written last), and well under way.
        wait_until(lambda: len(redis_client.keys("fanout:job:*")) > jobs_before, 60, "the job to be sent")
        wait_until(lambda: redis_client.llen(QUEUE) < 3900, 60, "the run to be under way")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, stderr
    assert "cancelling job " in stderr
    assert " cancelled: " in stderr and " done, " in stderr
    wait_until(lambda: queue_is_empty(redis_client), 30, "the queue to empty")


def test_a_failure_budget_stops_the_job_and_says_so(cli_env: dict[str, str], worker: LocalWorker) -> None:
    items = "".join(json.dumps(i) + "\n" for i in range(400))
    proc = run_cli(
        cli_env, "map", "tests.userjobs:odd_fails", "--input", "-", "--kwargs", '{"seconds": 0.01}',
        "--batch-size", "5", "--max-failures", "5%", "--json",
        stdin=items,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    document = json.loads(proc.stdout)
    assert document["stopped"].startswith("failure budget exceeded: ")
    assert "items failed (at most 20 allowed)" in document["stopped"]
    odd = [e for e in document["errors"] if e["error"].startswith("ValueError")]
    not_run = [e for e in document["errors"] if e["error"] == document["stopped"]]
    assert len(odd) > 20 and not_run, "the job should have stopped early"
    assert len(odd) + len(not_run) + document["succeeded"] == 400


def test_the_failure_budget_from_python(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.odd_fails, list(range(200)), batch_size=2, max_failures=3)
    assert outcome.data["stopped"].startswith("failure budget exceeded")
    assert outcome.succeeded < 100
    with pytest.raises(fanout.InputError, match="max_failures"):
        fanout.submit(userjobs.odd_fails, [1], max_failures="lots")


def test_retry_sends_only_the_failed_items_and_merges_in_input_order(
    worker: LocalWorker, tmp_path: Path
) -> None:
    paths = [tmp_path / f"{i}.txt" for i in range(6)]
    for i in (0, 2, 3, 5):
        paths[i].write_text(f"v{i}")
    job = fanout.submit(userjobs.needs_file, [str(p) for p in paths], batch_size=2)
    first = job.wait(timeout=60)
    assert [f.index for f in first.errors] == [1, 4]
    for i in (1, 4):
        paths[i].write_text(f"again{i}")
    paths[0].write_text("changed")  # a success is carried over, not run again
    again = job.retry_failed()
    assert again.total == 2
    outcome = again.wait(timeout=60)
    assert outcome.results == ["v0", "again1", "v2", "v3", "again4", "v5"]
    assert outcome.ok and outcome.data["retry_of"] == job.id


def test_retry_of_a_resize_lands_in_the_same_out_with_one_manifest(
    cli_env: dict[str, str], worker: LocalWorker, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    for i in range(4):
        make_photo(photos / f"p{i}.jpg", (400, 300), seed=i)
    (photos / "p2.jpg").write_bytes(b"not yet a photo")
    out = tmp_path / "out"
    first = run_cli(cli_env, "resize", str(photos), "--out", str(out), "--max-side", "64", "--json")
    assert first.returncode == 1
    job_id = json.loads(first.stdout)["job_id"]
    make_photo(photos / "p2.jpg", (400, 300), seed=2)
    again = run_cli(cli_env, "retry", job_id, "--json")
    assert again.returncode == 0, again.stderr
    document = json.loads(again.stdout)
    assert document["retry_of"] == job_id and document["failed"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["succeeded"] == 4 and [i["ok"] for i in manifest["items"]] == [True] * 4
    assert sorted(p.name for p in out.glob("p*.jpg")) == [f"p{i}.jpg" for i in range(4)]


def test_resize_skip_existing_does_only_what_is_missing(
    cli_env: dict[str, str], worker: LocalWorker, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    for i in range(5):
        make_photo(photos / f"p{i}.jpg", (400, 300), seed=i)
    out = tmp_path / "out"
    first = run_cli(cli_env, "resize", str(photos), "--out", str(out), "--max-side", "64")
    assert first.returncode == 0, first.stderr
    (out / "p1.jpg").unlink()  # as a crash would leave it
    (out / "p3.jpg").write_bytes(b"half a jp")  # a partial file is made again
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("p*.jpg")}
    second = run_cli(
        cli_env, "resize", str(photos), "--out", str(out), "--max-side", "64", "--skip-existing", "--json"
    )
    assert second.returncode == 0, second.stderr
    records = json.loads(second.stdout)["results"]
    assert [bool(r.get("skipped")) for r in records] == [True, False, True, False, True]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("p*.jpg")}
    assert [after[f"p{i}.jpg"] == before[f"p{i}.jpg"] for i in (0, 2, 4)] == [True] * 3
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [o.get("skipped", False) for item in manifest["items"] for o in item["outputs"]]
    assert skipped == [True, False, True, False, True]


def test_another_celery_app_on_the_same_database_takes_none_of_fanouts_messages(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    other_module = tmp_path / "otherapp.py"
    other_module.write_text(
        "from celery import Celery\n"
        f"app = Celery('other', broker={TEST_REDIS_URL!r}, backend={TEST_REDIS_URL!r})\n"
        "app.conf.update(task_serializer='json', accept_content=['json'], result_serializer='json')\n"
        "@app.task(name='other.add')\n"
        "def add(a, b):\n"
        "    return a + b\n"
    )
    log = tmp_path / "other.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with open(log, "wb") as log_file:
        other = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "otherapp", "worker", "-c", "1", "--loglevel", "INFO",
             "--hostname", "other@%h", "--without-gossip", "--without-mingle"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        sys.path.insert(0, str(tmp_path))
        import otherapp  # type: ignore[import-not-found]

        wait_until(lambda: bool(otherapp.app.control.ping(timeout=0.5)), 60, "the other app's worker")
        theirs = [otherapp.add.delay(i, i) for i in range(50)]
        ours = fanout.map(userjobs.triple, list(range(5000)), batch_size=10)
        assert ours.results == [3 * i for i in range(5000)] and ours.ok
        assert [r.get(timeout=60) for r in theirs] == [2 * i for i in range(50)]
        text = log.read_text()
        assert "unregistered task" not in text.lower()
        assert "fanout." not in text and "tests.userjobs" not in text
        assert not any(
            "other.add" in line
            for line in ((worker.log_path and Path(worker.log_path).read_text()) or "").splitlines()
        )
    finally:
        sys.path.remove(str(tmp_path))
        os.killpg(other.pid, signal.SIGKILL)
        other.wait(10)
