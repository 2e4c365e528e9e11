"""Worker logs that name the job (workers/logs.py): the fields, both formats, and real workers' logs.

The unit tests format records by hand; the system tests read the log of a real
``celery worker`` that ran a known job, in the human format and in JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.local import LocalWorker
from tests.faultkit import QUICK, log_of, new_queue, rigged_job, send, wait_until
from tests.faulty import HANG
from workers import logs
from workers.attempts import MAX_KILLS
from workers.errors import ConfigError, InfrastructureError
from workers.settings import Settings

JOB = "5e3c0c1e-2f1b-4f5e-9a51-0123456789ab"
#: A header message's chord option, as publish.py embeds it: the callback, told its job.
CHORD = {"task": "fanout.collect", "kwargs": {"job": {"job_id": JOB}}, "options": {"task_id": JOB}}


def record(message: str = "hello %s", args: tuple[Any, ...] = ("there",), **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("workers.core", logging.WARNING, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


@pytest.fixture
def batch() -> Iterator[logs.Batch]:
    running = logs.begin(CHORD, "myjobs.score", 100, [1, 2, 3])
    yield running
    logs.end()


# --- the fields -------------------------------------------------------------------------------


def test_the_job_id_is_read_from_the_chord_callback_each_header_message_carries() -> None:
    assert logs.job_id(CHORD) == JOB
    assert logs.job_id({"options": {"task_id": JOB}}) == JOB  # a callback without fanout's kwargs
    assert logs.job_id(None) is None


@pytest.mark.parametrize(
    ("items", "count"),
    [([1, 2, 3], 3), ({"range": [10, 25]}, 15), ({"url": "file:///x", "count": 7}, 7)],
)
def test_a_batch_counts_its_items_however_they_travel(items: Any, count: int) -> None:
    assert logs.begin(CHORD, "t", 40, items).fields() == {
        "job_id": JOB,
        "task": "t",
        "start": 40,
        "end": 40 + count,
        "count": count,
    }
    logs.end()


def test_a_record_logged_during_a_batch_gets_its_fields_and_none_after(batch: logs.Batch) -> None:
    during = record()
    assert logs.BatchFields().filter(during) is True
    assert during.__dict__["fanout"] == {
        "job_id": JOB,
        "task": "myjobs.score",
        "start": 100,
        "end": 103,
        "count": 3,
    }
    logs.end()
    after = record()
    logs.BatchFields().filter(after)
    assert not hasattr(after, "fanout")


def test_fields_passed_explicitly_are_kept_over_the_running_batch(batch: logs.Batch) -> None:
    explicit = record(**logs.about_item(101))
    logs.BatchFields().filter(explicit)
    assert explicit.__dict__["fanout"]["index"] == 101 and explicit.__dict__["fanout"]["start"] == 100


def test_a_request_in_the_main_process_names_its_batch() -> None:
    request = SimpleNamespace(args=[200, {"range": [200, 250]}, {}], chord=CHORD, task_name="myjobs.score")
    assert logs.of_request(request) == logs.Batch(JOB, "myjobs.score", 200, 250)
    assert logs.of_request(SimpleNamespace(args=[], chord=None, task_name="fanout.collect")) is None


# --- the formats ------------------------------------------------------------------------------


def test_the_human_format_puts_the_fields_in_front_of_the_message_and_leaves_the_record_alone() -> None:
    formatter = logs.HumanFormatter(logging.Formatter("%(levelname)s %(message)s"))
    batch = logs.Batch(JOB, "myjobs.score", 0, 100)
    rec = record("batch finished", (), **logs.extra(batch, seconds=0.25, done=98, failed=2))
    assert formatter.format(rec) == (
        f"WARNING job={JOB} task=myjobs.score items=[0, 100) count=100 seconds=0.25 done=98 failed=2: "
        "batch finished"
    )
    assert (rec.msg, rec.args) == ("batch finished", ())  # another handler formats it afresh
    assert formatter.format(record()) == "WARNING hello there"  # a line about no batch: as it was


def test_the_json_format_is_one_object_per_line_with_the_fields_as_keys() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    rec = record("item %d raised", (7,), **logs.extra(logs.Batch(JOB, "t", 0, 10), index=7))
    rec.exc_info = exc_info
    line = logs.JsonFormatter().format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "item 7 raised" and doc["level"] == "WARNING" and doc["logger"] == "workers.core"
    assert (doc["job_id"], doc["start"], doc["end"], doc["count"], doc["index"]) == (JOB, 0, 10, 10, 7)
    assert doc["traceback"].startswith("Traceback") and doc["traceback"].endswith("ValueError: boom")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", doc["ts"])


def test_applying_the_format_twice_wraps_a_handler_once() -> None:
    target = logging.getLogger("tests.logs.apply")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    target.addHandler(handler)
    try:
        logs.apply(target, "human")
        logs.apply(target, "human")
        assert isinstance(handler.formatter, logs.HumanFormatter)
        assert not isinstance(handler.formatter.inner, logs.HumanFormatter)
        assert sum(isinstance(f, logs.BatchFields) for f in handler.filters) == 1
    finally:
        target.removeHandler(handler)


def test_the_log_format_is_human_by_default_and_a_bad_one_is_refused_by_name() -> None:
    assert Settings.from_env({}).log_format == "human"
    assert Settings.from_env({"FANOUT_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="FANOUT_LOG_FORMAT='yaml': expected one of human, json"):
        Settings.from_env({"FANOUT_LOG_FORMAT": "yaml"})


def test_fanout_worker_with_a_bad_log_format_exits_2_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_LOG_FORMAT", "yaml")
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code == 2 and "FANOUT_LOG_FORMAT" in result.output


# --- real workers -----------------------------------------------------------------------------

#: odd_fails over 0..9 in batches of 4: [0, 4), [4, 8), [8, 10); the odd values fail.
VALUES = list(range(10))
BATCHES = [(0, 4), (4, 8), (8, 10)]


def run_odd_fails(app: Celery, worker: Callable[[str], LocalWorker]) -> tuple[str, LocalWorker]:
    """Run the known job on a worker of its own; return its job id and the worker, once the job is done."""
    queue = new_queue()
    local = worker(queue)
    built = rigged_job(app, VALUES, 4, queue, task="tests.userjobs.odd_fails", kwargs={"seconds": 0.0})
    outcome = send(app, built).wait(60)
    assert outcome["failed"] == 5
    return built.plan.job_id, local


@pytest.mark.system
def test_a_worker_logs_each_batch_of_a_known_job_with_its_fields(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    env = {"FANOUT_IMPORTS": "tests.userjobs"}
    job_id, local = run_odd_fails(app, lambda queue: start_worker(app, queue, "human", env=env))
    finished = re.compile(
        rf"job={job_id} task=tests.userjobs.odd_fails items=\[(\d+), (\d+)\) count=(\d+) "
        r"seconds=([0-9.e-]+) done=(\d+) failed=(\d+): batch finished"
    )
    wait_until(lambda: len(finished.findall(log_of(local))) >= 3, 10, "the last batch's line")
    lines = sorted(finished.findall(log_of(local)), key=lambda found: int(found[0]))
    assert [(int(s), int(e), int(c), int(d), int(f)) for s, e, c, _, d, f in lines] == [
        (0, 4, 4, 2, 2),
        (4, 8, 4, 2, 2),
        (8, 10, 2, 1, 1),
    ]
    assert all(float(found[3]) >= 0 for found in lines)
    # Each failed item: its traceback once, on a line naming its job, batch and index.
    text = log_of(local)
    for index in (1, 3, 5, 7, 9):
        start, end = BATCHES[index // 4]
        assert text.count(f"ValueError: {index} is odd\n") == 1, text
        named = f"job={job_id} task=tests.userjobs.odd_fails items=[{start}, {end}) count={end - start}"
        assert f"{named} index={index}: item {index} ({index}) raised\nTraceback (most recent" in text
    assert text.count("Traceback (most recent call last)") == 5


@pytest.mark.system
def test_an_item_that_fails_every_retry_logs_each_retry_and_its_traceback_once(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    queue = new_queue()
    local = start_worker(app, queue, "retries", env={"FANOUT_IMPORTS": "tests.userjobs"})
    built = rigged_job(app, ["a", "b"], 2, queue, task="tests.userjobs.always_flaky", kwargs={})
    assert send(app, built).wait(60)["failed"] == 2
    named = f"job={built.plan.job_id} task=tests.userjobs.always_flaky items=[0, 2) count=2"
    wait_until(lambda: f"{named} seconds=" in log_of(local), 10, "the batch's line")
    text = log_of(local)
    for index, key in enumerate("ab"):
        assert f"{named} index={index}: item {index} ('{key}') failed ({key} never works); attempt 2" in text
        assert f"{named} index={index}: item {index} ('{key}') raised on its last attempt\nTraceback" in text
        assert text.count(f"Flaky: {key} never works\n") == 1  # the first attempt's: no traceback
    assert text.count("Traceback (most recent call last)") == 2


@pytest.mark.system
def test_json_logs_parse_line_by_line_and_carry_the_job_fields(
    app: Celery, workers_started: list[LocalWorker], tmp_path: Path
) -> None:
    logfile = tmp_path / "worker.jsonl"  # the log alone: Celery's banner goes to stdout

    def json_worker(queue: str) -> LocalWorker:
        local = LocalWorker(
            app,
            name="json",
            env={**os.environ, "FANOUT_IMPORTS": "tests.userjobs", "FANOUT_LOG_FORMAT": "json"},
            log_path=str(tmp_path / "stdout.log"),
            extra_args=["--queues", queue, "--logfile", str(logfile)],
        )
        workers_started.append(local)  # stopped after the test
        return local.start(timeout=60)

    job_id, _ = run_odd_fails(app, json_worker)

    def docs() -> list[dict[str, Any]]:
        return [json.loads(line) for line in logfile.read_text().splitlines()]  # every line parses

    wait_until(lambda: sum(d["message"] == "batch finished" for d in docs()) >= 3, 10, "the batch lines")
    parsed = docs()
    assert all({"ts", "level", "logger", "message"} <= doc.keys() for doc in parsed)
    done = sorted((d for d in parsed if d["message"] == "batch finished"), key=lambda d: d["start"])
    assert [(d["job_id"], d["start"], d["end"], d["count"], d["failed"]) for d in done] == [
        (job_id, start, end, end - start, (end - start + 1) // 2) for start, end in BATCHES
    ]
    assert all(isinstance(d["seconds"], float) and d["seconds"] >= 0 for d in done)
    for index in (1, 3, 5, 7, 9):
        tracebacks = [d for d in parsed if f"ValueError: {index} is odd" in d.get("traceback", "")]
        assert len(tracebacks) == 1, tracebacks
        start, end = BATCHES[index // 4]
        assert {k: tracebacks[0][k] for k in ("job_id", "index", "start", "end")} == {
            "job_id": job_id,
            "index": index,
            "start": start,
            "end": end,
        }


@pytest.mark.system
def test_a_worker_with_a_bad_log_format_stops_at_start_naming_it(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    log = tmp_path / "bad.log"
    local = LocalWorker(app, env={**os.environ, "FANOUT_LOG_FORMAT": "yaml"}, log_path=str(log))
    workers_started.append(local)  # stopped afterwards should it start after all
    with pytest.raises(InfrastructureError, match="exited with code"):
        local.start(timeout=60)
    assert "FANOUT_LOG_FORMAT='yaml': expected one of human, json" in log.read_text()


@pytest.mark.system
def test_a_batch_requeued_at_its_hard_time_limit_and_its_poison_item_are_logged_with_the_job(
    app: Celery, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    # The requeue is logged by the worker's main process, the poison item by the pool process
    # that reruns the batch: both name the job and the batch [2, 4).
    queue = new_queue()
    env = {**QUICK, "FANOUT_VISIBILITY_TIMEOUT": "600", "FANOUT_TASK_TIME_LIMIT": "2"}
    local = start_worker(app, queue, "hang", env=env)
    built = rigged_job(app, [0, 1, [HANG, 2], 3], 2, queue, marks=marks, limits=(2, 1))
    assert send(app, built).wait(timeout=60)["errors"][0]["index"] == 2
    named = f"job={built.plan.job_id} task=fanout.test.rigged_batch items=[2, 4) count=2"
    wait_until(lambda: f"{named} seconds=" in log_of(local), 10, "the batch's line")
    text = log_of(local)
    # The first run and MAX_KILLS counted reruns hit the limit (Celery's soft limit line first).
    assert text.count(f"{named}: Soft time limit (1s) exceeded") == MAX_KILLS + 1, text
    assert text.count(f"{named}: hard time limit (2s) exceeded") == MAX_KILLS + 1
    assert f"{named}: item 2 (['hang', 2]) killed its worker process each of the {MAX_KILLS} times" in text
