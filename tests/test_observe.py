"""Seeing every job: ``fanout jobs`` (the job index) and ``fanout exporter`` (Prometheus metrics).

Unit tests on the counting and the metric families; system tests with the
session's real worker: jobs running, done, failed and cancelled listed in
``--json`` and on a terminal with ``--watch``, the index forgetting expired
jobs, and the exporter as a process whose counters move by exactly a job's items.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.exporter import FAMILIES, Snapshot, families
from orchestrator.joblist import JobRow, age, table
from orchestrator.local import LocalWorker
from tests.conftest import fanout_command
from tests.faultkit import free_port
from workers import jobindex, keys, metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "fanout-dashboard.json"


# --- counting a batch (no Redis) ---


def test_a_batch_is_counted_by_outcome_and_its_failures_by_exception() -> None:
    part: Any = {
        "start": 0,
        "results": [1, None, None, None, None, 6],
        "errors": [
            {"index": 1, "input": 1, "error": "KeyError: 1"},
            {"index": 2, "input": 2, "error": "KeyError: 2"},
            {"index": 3, "input": 3, "error": "the batch reached its soft time limit (20 s) while it ran"},
            {"index": 4, "input": 4, "error": "cancelled"},
        ],
        "transient": 0,
    }
    counts = metrics.batch_counts(part, "cancelled", {"KeyError": 2})
    assert (counts.succeeded, counts.failed, counts.cancelled) == (2, 3, 1)
    assert counts.exceptions == {"KeyError": 2, "SoftTimeLimitExceeded": 1}
    # No exception seen (an ItemError's reason, a worker killed): named from the text, else "other".
    other: Any = {**part, "errors": [*part["errors"][:1], {"error": "boom"}]}
    bare = metrics.batch_counts(other, None, {})
    assert bare.exceptions == {"KeyError": 1, "other": 1}


def test_a_duration_falls_in_the_first_bucket_that_holds_it() -> None:
    assert [metrics.le(s) for s in (0.0, 0.05, 0.051, 7, 600, 601)] == [
        "0.05",
        "0.05",
        "0.1",
        "10.0",
        "600.0",
        "+Inf",
    ]


def _samples(snap: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families(snap, "fanout", 0.01)
        for s in family.samples
    }


def test_the_histogram_is_cumulative_and_the_counters_carry_task_and_exception() -> None:
    sep = metrics.SEP
    snap = Snapshot(
        counters={
            sep.join(("items", "succeeded", "t")): 90,
            sep.join(("items", "failed", "t")): 10,
            sep.join(("failures", "t", "KeyError")): 7,
            sep.join(("failures", "t", "ValueError")): 3,
            sep.join(("batch", "t", "0.1")): 2,
            sep.join(("batch", "t", "5.0")): 1,
            sep.join(("batch_count", "t")): 3,
            sep.join(("batch_sum", "t")): 4.2,
        },
        jobs={"running": 1, "done": 2},
        lengths={"fanout": 5},
        workers=[
            {"queues": ["fanout"], "concurrency": 4, "reserved": {"fanout": 2}, "active": {"fanout": 4}}
        ],
    )
    got = _samples(snap)
    assert got[("fanout_items_succeeded_total", (("name", "t"),))] == 90
    assert got[("fanout_items_failed_total", (("exception", "KeyError"), ("name", "t")))] == 7
    bucket = "fanout_batch_duration_seconds_bucket"
    assert [got[(bucket, (("le", le), ("name", "t")))] for le in ("0.05", "0.1", "2.5", "5.0", "+Inf")] == [
        0,
        2,
        2,
        3,
        3,
    ]
    assert got[("fanout_batch_duration_seconds_count", (("name", "t"),))] == 3
    assert got[("fanout_jobs", (("state", "running"),))] == 1
    assert got[("fanout_jobs", (("state", "cancelled"),))] == 0
    queue = (("queue_name", "fanout"),)
    assert got[("fanout_queue_backlog", queue)] == 5 + 2  # waiting + reserved, not the running ones
    assert (got[("fanout_queue_active", queue)], got[("fanout_active_process_count", queue)]) == (4, 4)
    served = {family.name for family in families(snap, "fanout", 0.0)}
    assert {name.removesuffix("_total") for name in FAMILIES} == served


def test_a_job_s_state_comes_from_its_outcome() -> None:
    assert jobindex.final_state({"failed": 0}, "cancelled") == "done"
    assert jobindex.final_state({"failed": 3}, "cancelled") == "failed"
    assert jobindex.final_state({"failed": 0, "reduce_error": "x"}, "cancelled") == "failed"
    assert jobindex.final_state({"failed": 5, "stopped": "cancelled"}, "cancelled") == "cancelled"
    assert jobindex.final_state({"failed": 5, "stopped": "failure budget exceeded"}, "cancelled") == "failed"


def test_the_table_aligns_one_row_a_job() -> None:
    row = JobRow("abc", "double", "running", 1500, 2, 1, 3000, 100.0, None, "host-1")
    text = table([row], now=110.0)
    header, line = text.splitlines()
    assert header.split() == ["JOB", "TASK", "STATE", "DONE", "FAILED", "TOTAL", "ITEMS/S", "AGE", "HOST"]
    assert line.split() == ["abc", "double", "running", "1,500", "3", "3,000", "150", "10s", "host-1"]
    assert [age(s) for s in (5, 61, 7200, 90000)] == ["5s", "1m", "2h", "1d"]


# --- the dashboard and the autoscaler (no Redis) ---


def test_every_query_of_the_dashboard_names_a_metric_the_exporter_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 5
    served = set(FAMILIES) | {
        f"{n}_{s}" for n, k in FAMILIES.items() if k == "histogram" for s in ("bucket", "sum", "count")
    }
    for expr in exprs:
        named = set(re.findall(r"\b(fanout_[a-z_]+)", expr))
        assert named, expr
        assert named <= served, f"{expr}: {named - served} not served"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "backlog", "failures", "workers", "batch duration"):
        assert topic in titles


def test_the_keda_example_scales_on_the_backlog_the_exporter_serves() -> None:
    import yaml

    scaled = yaml.safe_load((ROOT / "deploy" / "keda" / "scaledobject.yaml").read_text())
    assert scaled["kind"] == "ScaledObject"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(re.findall(r"\b(fanout_[a-z_]+)", trigger["metadata"]["query"])) == {"fanout_queue_backlog"}


def test_flower_s_search_finds_a_job_s_batches_and_fan_in_by_the_job_id_s_first_24_characters() -> None:
    # What docs/observability.md tells a user to type into Flower's Tasks search box.
    import uuid

    from celery.events.state import Task
    from flower.utils.search import TaskSearchEngine

    from workers.batches import batch_task_id

    job_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    tasks = {batch_task_id(job_id, i): Task(uuid=batch_task_id(job_id, i), name="t") for i in range(300)}
    tasks[job_id] = Task(uuid=job_id, name="fanout.collect")
    tasks |= {batch_task_id(other, i): Task(uuid=batch_task_id(other, i), name="t") for i in range(5)}
    engine = TaskSearchEngine()
    for task in tasks.values():
        engine.upsert(task)
    found = set(engine.search(tasks, job_id[:24]).task_ids)
    assert found == {batch_task_id(job_id, i) for i in range(300)} | {job_id}


def test_the_metrics_profile_adds_an_exporter_that_prometheus_scrapes_on_loopback_only() -> None:
    import yaml

    from tests.composefile import service

    exporter, prometheus = service("exporter"), service("prometheus")
    assert exporter["profiles"] == prometheus["profiles"] == ["metrics"]  # off unless asked for
    assert exporter["command"] == ["fanout", "exporter", "--port", "9809"]
    assert exporter["ports"] == ["127.0.0.1:9809:9809"] and prometheus["ports"] == ["127.0.0.1:9090:9090"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"] if v.startswith("./")}
    assert mounted == {"./deploy/prometheus/prometheus.yml": "/etc/prometheus/prometheus.yml"}
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["exporter:9809"]}]


# --- with Redis and the session's worker ---


def _jobs_json(*args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["jobs", "--json", *args])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.output)
    return rows


@pytest.mark.system
def test_fanout_jobs_lists_running_done_failed_and_cancelled_jobs_newest_first(worker: LocalWorker) -> None:
    import fanout
    from tests import userjobs

    done = fanout.submit(userjobs.triple, range(10))
    done.wait(60)
    failed = fanout.submit(userjobs.seen_fails, range(20), batch_size=5)  # 0, 7, 14 fail
    failed.wait(60)
    job = fanout.submit(userjobs.sleepy, [0.5] * 60, batch_size=1)  # about 15 s on 2 processes
    try:
        deadline = time.monotonic() + 30
        while not job.progress().items_done and time.monotonic() < deadline:
            time.sleep(0.2)
        rows = _jobs_json()
    finally:
        job.cancel(terminate=True)
        job.wait(60)
    assert [row["job_id"] for row in rows[:3]] == [job.id, failed.id, done.id]
    running = rows[0]
    assert running["state"] == "running" and 0 < running["succeeded"] < 60, running
    assert running["host"] == os.uname().nodename and running["items_per_s"] > 0
    by_id = {row["job_id"]: row for row in rows}
    assert {k: by_id[done.id][k] for k in ("task", "state", "succeeded", "failed", "total")} == {
        "task": "tests.userjobs.triple", "state": "done", "succeeded": 10, "failed": 0, "total": 10,
    }  # fmt: skip
    assert [by_id[failed.id][k] for k in ("state", "succeeded", "failed", "cancelled")] == [
        "failed",
        17,
        3,
        0,
    ]
    (cancelled,) = [row for row in _jobs_json() if row["job_id"] == job.id]
    assert cancelled["state"] == "cancelled" and cancelled["cancelled"] > 0, cancelled
    assert cancelled["succeeded"] + cancelled["failed"] + cancelled["cancelled"] == 60
    assert _jobs_json("--all")[:3] == _jobs_json()[:3]


@pytest.mark.system
def test_the_list_forgets_a_job_whose_record_is_gone_or_older_than_the_results(
    app: Celery, worker: LocalWorker
) -> None:
    import fanout
    from tests import userjobs
    from workers.settings import get_settings

    gone = fanout.submit(userjobs.triple, range(3))
    gone.wait(60)
    old = fanout.submit(userjobs.triple, range(3))
    old.wait(60)
    client = app.backend.client
    client.delete(keys.job(gone.id))  # as if it expired
    expires = get_settings().result_expires
    client.zadd(keys.JOBS, {old.id: time.time() - expires - 10})  # sent longer ago than results are kept
    listed = {row["job_id"] for row in _jobs_json("--all")}
    assert gone.id not in listed and old.id not in listed
    assert client.zscore(keys.JOBS, gone.id) is None and client.zscore(keys.JOBS, old.id) is None
    assert client.zscore(keys.jobs_ended("done"), gone.id) is None


def _read_until(fd: int, enough: Callable[[bytes], bool], timeout: float) -> bytes:
    """What the terminal ``fd`` shows until ``enough(all of it)`` or ``timeout`` seconds."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not enough(seen) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


@pytest.mark.system
def test_watch_redraws_the_table_in_place_on_a_terminal_until_ctrl_c(
    cli_env: dict[str, str], worker: LocalWorker
) -> None:
    import fanout
    from tests import userjobs

    job = fanout.submit(userjobs.triple, range(5))
    job.wait(60)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        fanout_command("jobs", "--watch", "--interval", "0.3"),
        env=cli_env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    try:
        # Two frames, the second drawn over the first, each listing the job.
        seen = _read_until(leader, lambda shown: shown.count(job.id.encode()) >= 2, 60)
        assert seen.count(b"\x1b[H") >= 2 and seen.count(job.id.encode()) >= 2, seen[-2000:]
        assert b"\x1b[2J" in seen and b"Ctrl-C" in seen
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(leader)


@pytest.fixture
def exporter(cli_env: dict[str, str], worker: LocalWorker, tmp_path: Path) -> Iterator[str]:
    """``fanout exporter`` as a process on a free port; its /metrics URL."""
    port = free_port()
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            fanout_command("exporter", "--port", str(port), "--address", "127.0.0.1"),
            env=cli_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(url)
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"the exporter did not answer in 30 s: {log.read_text()}"
                time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
        assert code == 0, log.read_text()


def scrape(url: str) -> dict[str, float]:
    """``url``'s samples: ``name{labels}`` -> value, the labels sorted by name."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metric, _, labels = name.partition("{")
            pairs = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            key = metric + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
            samples[key] = float(value)
    return samples


@pytest.mark.system
def test_the_exporter_counts_a_job_s_items_failures_and_batches_exactly(exporter: str) -> None:
    import fanout
    from tests import userjobs

    task = 'name="tests.userjobs.seen_fails"'
    before = scrape(exporter)
    outcome = fanout.map(userjobs.seen_fails, range(1000), batch_size=50, timeout=60)  # every 7th fails
    assert outcome.failed == 143
    after = scrape(exporter)

    def delta(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert delta(f"fanout_items_succeeded_total{{{task}}}") == 857
    assert delta(f'fanout_items_failed_total{{exception="KeyError",{task}}}') == 143
    assert delta(f"fanout_batch_duration_seconds_count{{{task}}}") == 20
    assert delta(f'fanout_batch_duration_seconds_bucket{{le="+Inf",{task}}}') == 20
    assert delta('fanout_jobs{state="failed"}') == 1
    assert after["fanout_up"] == 1
    assert after['fanout_active_worker_count{queue_name="fanout"}'] >= 1
    assert after['fanout_active_process_count{queue_name="fanout"}'] >= 2
