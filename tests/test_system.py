"""System tests: the real ``fanout`` CLI and real ``celery worker`` processes over a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from celery import Celery
from PIL import Image

from orchestrator import builtin
from orchestrator.discovery import list_workers
from orchestrator.follow import wait
from orchestrator.jobs import load_record
from orchestrator.local import LocalWorker
from orchestrator.samples import make_photo
from orchestrator.send import publish
from tests.conftest import fanout_command

pytestmark = pytest.mark.system


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 90, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fanout_command(*args), env=env, capture_output=True, text=True, timeout=timeout, input=stdin
    )


def test_worker_fixture_answers_with_its_concurrency(app: Celery, worker: LocalWorker) -> None:
    found = {w.name: w.concurrency for w in list_workers(app)}
    assert found.get(worker.hostname) == 2


def test_results_come_back_in_input_order_under_uneven_durations(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    # Big and tiny images alternate, one task each: tasks finish out of input order.
    sources = []
    for i in range(8):
        size = (2400, 1800) if i % 2 == 0 else (32, 24)
        sources.append(make_photo(tmp_path / "in" / f"{i}.jpg", size, seed=i))
    pairs = [(str(s), str(tmp_path / "out" / s.name)) for s in sources]
    job = publish(app, builtin.resize(pairs, 64, str(tmp_path / "out")), 1)
    outcome = wait(app, job, timeout=60)
    assert outcome["failed"] == 0
    assert [r["source"] for r in outcome["results"]] == [str(s) for s in sources]
    assert [max(r["width"], r["height"]) for r in outcome["results"]] == [64, 32] * 4
    record = load_record(app, job.job_id)
    assert record is not None and record["group_id"] == job.group_id and record["total"] == 8


def test_bad_values_sent_past_the_cli_are_per_item_errors(app: Celery, worker: LocalWorker) -> None:
    values: list[object] = [1, "x", 3, None, 2**100, True, 1.5, -4]
    job = publish(app, builtin.double(values), 3)  # type: ignore[arg-type]
    outcome = wait(app, job, timeout=60)
    assert outcome["results"] == [2, None, 6, None, 2**101, None, None, -8]
    assert [e["index"] for e in outcome["errors"]] == [1, 3, 5, 6]
    assert all("expected an integer" in e["error"] for e in outcome["errors"])
    assert (outcome["succeeded"], outcome["failed"]) == (4, 4)


def test_cli_double_json_prints_results_in_order(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(cli_env, "double", "--json", "1", "2", "3")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["results"] == [2, 4, 6]
    assert (doc["task"], doc["total"], doc["succeeded"], doc["failed"], doc["errors"]) == (
        "double",
        3,
        3,
        0,
        [],
    )
    assert set(doc) == {"job_id", "task", "total", "succeeded", "failed", "results", "errors", "elapsed_s"}


def test_cli_double_range_and_stdin(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(cli_env, "double", "--range", "5000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(2 * i) for i in range(5000)]
    proc = run_cli(cli_env, "double", "-", stdin=f"7 -8\n{2**100}\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["14", "-16", str(2**101)]


def test_cli_double_one_task_per_item(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(cli_env, "double", "--range", "300", "--batch-size", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"] == [2 * i for i in range(300)]


def test_cli_resize_reports_the_corrupt_file_and_resizes_the_rest(
    cli_env: dict[str, str], worker: LocalWorker, photos: Path, tmp_path: Path
) -> None:
    (photos / "nested").mkdir()
    (photos / "nested" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (photos / "notes.txt").write_text("skip me")
    out = tmp_path / "out"
    proc = run_cli(cli_env, "resize", str(photos), "--out", str(out), "--max-side", "200", "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["total"], doc["succeeded"], doc["failed"], doc["skipped"]) == (7, 6, 1, 1)
    [error] = doc["errors"]
    assert error["input"] == str(photos / "nested" / "corrupt.jpg")
    assert doc["results"][error["index"]] is None
    for record in filter(None, doc["results"]):
        with Image.open(record["destination"]) as im:
            assert max(im.size) == 200
            assert im.size == (record["width"], record["height"])
    with Image.open(out / "p3.jpg") as im:
        assert im.size == (150, 200)  # EXIF-rotated portrait
    manifest = json.loads((out / "manifest.json").read_text())
    assert [item["index"] for item in manifest["items"]] == list(range(7))
    assert manifest["items"][error["index"]]["ok"] is False


def test_cli_exit_3_when_redis_is_unreachable(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, FANOUT_REDIS_URL="redis://127.0.0.1:1/0")
    proc = run_cli(env, "double", "1", timeout=10)  # the bound the CLI promises
    assert proc.returncode == 3
    assert "cannot reach Redis" in proc.stderr and "FANOUT_REDIS_URL" in proc.stderr


REFUSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.mark.parametrize(
    ("broker", "backend", "named"),
    [
        ("test", REFUSED, "(result backend) at redis://127.0.0.1:1/0"),
        (REFUSED, "test", "(broker) at redis://127.0.0.1:1/0"),
        (REFUSED, REFUSED, "(broker and result backend) at redis://127.0.0.1:1/0"),
        ("test", "redis://:s3cret@127.0.0.1:1/2", "(result backend) at redis://:**@127.0.0.1:1/2"),
    ],
)
def test_the_preflight_check_names_the_redis_that_does_not_answer(
    redis_client: object, broker: str, backend: str, named: str
) -> None:
    from orchestrator.send import check_redis
    from tests.conftest import TEST_REDIS_URL
    from workers.errors import InfrastructureError
    from workers.settings import Settings

    settings = Settings(
        broker_url=TEST_REDIS_URL if broker == "test" else broker,
        result_backend=TEST_REDIS_URL if backend == "test" else backend,
    )
    started = time.monotonic()
    with pytest.raises(InfrastructureError) as info:
        check_redis(settings)
    assert time.monotonic() - started < 5, "reported within a few seconds"
    message = str(info.value)
    assert f"cannot reach Redis {named}" in message, message
    assert "s3cret" not in message
    assert message.count("cannot reach") == 1


def test_the_preflight_check_passes_with_separate_broker_and_backend(
    redis_client: object, quiet_url: str
) -> None:
    from orchestrator.send import check_redis
    from tests.conftest import TEST_REDIS_URL
    from workers.settings import Settings

    check_redis(Settings(broker_url=TEST_REDIS_URL, result_backend=quiet_url))
    check_redis(Settings(broker_url=quiet_url, result_backend=TEST_REDIS_URL))


def test_cli_exit_3_when_no_worker_answers(cli_env: dict[str, str], quiet_url: str) -> None:
    env = dict(cli_env, FANOUT_REDIS_URL=quiet_url)
    proc = run_cli(env, "double", "1", timeout=30)
    assert proc.returncode == 3
    assert "no worker is running" in proc.stderr


def test_cli_exit_2_on_a_bad_setting(cli_env: dict[str, str]) -> None:
    proc = run_cli(dict(cli_env, FANOUT_REDIS_URL="http://nope"), "double", "1")
    assert proc.returncode == 2
    assert "FANOUT_REDIS_URL" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_workers_lists_the_worker(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(cli_env, "workers", "--json")
    assert proc.returncode == 0, proc.stderr
    found = {w["name"]: w for w in json.loads(proc.stdout)}
    assert found[worker.hostname]["concurrency"] == 2
    assert {"fanout.double_batch", "fanout.resize_items", "fanout.collect"} <= set(
        found[worker.hostname]["tasks"]
    )


def test_demo_starts_its_own_worker_when_none_answers(
    cli_env: dict[str, str], quiet_url: str, tmp_path: Path
) -> None:
    # A Redis no worker listens on: the demo must start (and stop) its own.
    env = dict(cli_env, FANOUT_REDIS_URL=quiet_url)
    proc = run_cli(env, "demo", "--dir", str(tmp_path), "--photos", "6", "--numbers", "2000", timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert "starting a local one" in proc.stderr
    assert "resize: 6 items, 6 succeeded, 0 failed" in proc.stderr
    assert "double: 2000 items, 2000 succeeded, 0 failed" in proc.stderr
    assert f"outputs: {tmp_path / 'resized'}" in proc.stdout
    assert len(list((tmp_path / "resized").glob("photo-*.jpg"))) == 6  # the photos, not the contact sheet
    assert json.loads((tmp_path / "resized" / "manifest.json").read_text())["succeeded"] == 6
    assert processes_using(quiet_url) == [], "the demo's worker should be gone"


def processes_using(redis_url: str) -> list[int]:
    """The processes whose environment points fanout at ``redis_url`` (workers started for it)."""
    wanted = f"FANOUT_REDIS_URL={redis_url}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def test_a_demo_killed_outright_leaves_no_worker_behind(
    app: Celery, cli_env: dict[str, str], quiet_url: str, tmp_path: Path
) -> None:
    # As a subprocess timeout ends it: SIGKILL, so no `finally` of the demo's own runs.
    from tests.faultkit import app_for

    env = dict(cli_env, FANOUT_REDIS_URL=quiet_url)
    quiet = app_for(quiet_url)
    demo = subprocess.Popen(
        fanout_command("demo", "--dir", str(tmp_path), "--photos", "24", "--numbers", "3000000"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(processes_using(quiet_url)) < 3:  # the demo, its worker and the worker's pool
            assert demo.poll() is None and time.monotonic() < deadline, "the demo's worker never started"
            time.sleep(0.05)
        demo.kill()
        assert demo.wait(10) == -signal.SIGKILL, "the demo should still have been running"
        deadline = time.monotonic() + 30  # a warm shutdown: the running batches finish first
        while processes_using(quiet_url):
            assert time.monotonic() < deadline, f"left behind: {processes_using(quiet_url)}"
            time.sleep(0.2)
        assert not quiet.control.ping(timeout=1)
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in processes_using(quiet_url):
            os.kill(pid, signal.SIGKILL)
        quiet.close()
