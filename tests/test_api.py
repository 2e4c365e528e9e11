"""The public API, ``import fanout``, with a user's task module run by a real worker.

The session's worker imports ``tests.userjobs`` and ``examples.wordcount``
through ``FANOUT_IMPORTS``, as a user's workers would; nothing here reaches
into fanout's internals to send or follow a job.
"""

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

import fanout
from orchestrator.local import LocalWorker
from tests import userjobs
from tests.conftest import fanout_command

pytestmark = pytest.mark.system


@fanout.task
def nowhere(value: int) -> int:
    """A task no worker has: this module is not on any worker's FANOUT_IMPORTS."""
    return value


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fanout_command(*args), env=env, capture_output=True, text=True, timeout=timeout, input=stdin
    )


def test_map_over_100000_items_keeps_input_order_reports_failures_by_index_and_reduces(
    worker: LocalWorker,
) -> None:
    items: list[object] = list(range(100_000))
    bad = {7: "seven", 54_321: 1.5, 99_999: None}
    for index, value in bad.items():
        items[index] = value
    outcome = fanout.map(userjobs.triple, items, reduce=userjobs.total, reduce_kwargs={"offset": 1})
    assert outcome.total == 100_000
    assert (outcome.succeeded, outcome.failed) == (100_000 - 3, 3)
    assert [f.index for f in outcome.errors] == sorted(bad)
    assert [f.input for f in outcome.errors] == [bad[i] for i in sorted(bad)]
    assert outcome.errors[0].error == "TypeError: expected an int, got str"
    expected = [None if i in bad else 3 * i for i in range(100_000)]
    assert outcome.results == expected
    assert outcome.reduced == {"sum": sum(v for v in expected if v is not None) + 1, "failed": sorted(bad)}
    assert not outcome.ok


def test_kwargs_reach_every_call(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.scale, [{"x": 1}, {"x": 2.5}], kwargs={"factor": 4}, batch_size=1)
    assert outcome.results == [4.0, 10.0] and outcome.ok


def test_a_result_that_is_not_json_is_that_items_error_naming_its_type(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.not_json, [1, 2])
    assert outcome.results == [None, None]
    assert [f.index for f in outcome.errors] == [0, 1]
    assert all("result: set is not JSON" in f.error for f in outcome.errors)


def test_an_item_that_is_not_json_is_refused_naming_its_index_and_nothing_is_sent(
    worker: LocalWorker, redis_client: redis.Redis
) -> None:
    before = set(redis_client.keys("fanout:job:*"))
    with pytest.raises(fanout.InputError, match=r"item 2 is not JSON: set"):
        fanout.submit(userjobs.triple, [1, 2, {3}])
    assert set(redis_client.keys("fanout:job:*")) == before


def test_no_worker_with_the_task_is_an_infrastructure_error_and_nothing_is_sent(
    worker: LocalWorker, redis_client: redis.Redis
) -> None:
    before = set(redis_client.keys("fanout:job:*"))
    with pytest.raises(fanout.InfrastructureError) as caught:
        fanout.map(nowhere, [1, 2, 3])
    assert "no worker has task tests.test_api.nowhere (set FANOUT_IMPORTS on the workers" in str(caught.value)
    assert set(redis_client.keys("fanout:job:*")) == before
    assert redis_client.llen("fanout") == 0


def test_an_item_is_retried_in_place_and_the_last_attempts_error_is_reported(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.flaky, ["a", "b"], batch_size=1)
    assert outcome.results == ["a after 3 attempts", "b after 3 attempts"]
    outcome = fanout.map(userjobs.always_flaky, ["c"])
    assert [(f.index, f.error) for f in outcome.errors] == [(0, "Flaky: c never works")]


def test_a_reduce_that_raises_leaves_the_outcome_complete(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.triple, [1, 2], reduce=userjobs.broken_reduce)
    assert outcome.results == [3, 6] and outcome.failed == 0
    assert outcome.reduced is None
    assert outcome.reduce_error == "tests.userjobs.broken_reduce: RuntimeError: the reduce itself fails"
    assert not outcome.ok


def odd_first(failing: int) -> list[int]:
    """``failing`` odd items (each fails) then 20 even ones: with one item a batch, each batch's
    failures counted as it ends, the job's count reaches exactly ``failing`` before its callback runs,
    whatever order the batches run in."""
    return [2 * k + 1 for k in range(failing)] + [2 * k for k in range(20)]


def test_a_failure_budget_of_n_lets_a_job_with_exactly_n_failures_finish(worker: LocalWorker) -> None:
    items = odd_first(3)
    outcome = fanout.map(userjobs.odd_fails, items, batch_size=1, max_failures=3)
    assert "stopped" not in outcome.data, outcome.data["stopped"]
    assert [(f.index, f.error) for f in outcome.errors] == [
        (0, "ValueError: 1 is odd"),
        (1, "ValueError: 3 is odd"),
        (2, "ValueError: 5 is odd"),
    ]
    assert outcome.results == [None] * 3 + items[3:]


def test_a_failure_budget_of_n_stops_the_job_at_n_plus_1_failures(worker: LocalWorker) -> None:
    items = odd_first(4)
    outcome = fanout.map(userjobs.odd_fails, items, batch_size=1, max_failures=3)
    assert outcome.data.get("stopped", "").startswith("failure budget exceeded"), outcome.data
    assert [(f.index, f.error) for f in outcome.errors[:4]] == [
        (i, f"ValueError: {items[i]} is odd") for i in range(4)
    ]


def test_cli_map_exits_1_when_the_reduce_fails_and_says_why(
    cli_env: dict[str, str], worker: LocalWorker
) -> None:
    reason = "tests.userjobs.broken_reduce: RuntimeError: the reduce itself fails"
    for extra in ([], ["--json"]):
        proc = run_cli(
            cli_env, "map", "tests.userjobs:triple", "--input", "-",
            "--reduce", "tests.userjobs:broken_reduce", *extra, stdin=jsonl([1, 2, 3]),
        )  # fmt: skip
        assert proc.returncode == 1, (extra, proc.stdout, proc.stderr)
        if extra:
            document = json.loads(proc.stdout)
            assert document["results"] == [3, 6, 9] and document["failed"] == 0
            assert document["reduce_error"] == reason and "reduced" not in document
        else:
            assert reason in proc.stderr and proc.stdout == ""


def test_the_soft_time_limit_stops_the_batch_at_its_item_and_keeps_what_finished(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.sleepy_limited, [0.1, 5, 0.1], batch_size=3)
    assert outcome.results == [0.1, None, None]
    assert [(f.index, f.error) for f in outcome.errors] == [
        (1, "the batch reached its soft time limit (2 s) while it ran"),
        (2, "not started: the batch reached its soft time limit (2 s) first"),
    ]


def test_as_completed_yields_every_index_once_as_batches_finish(worker: LocalWorker) -> None:
    # Uneven durations: batches finish out of input order.
    seconds = [0.3 if i % 3 == 0 else 0.0 for i in range(40)]
    job = fanout.submit(userjobs.sleepy, seconds, batch_size=2)
    seen: list[int] = []
    state_at_first = ""
    for index, value in job.as_completed(timeout=60):
        state_at_first = state_at_first or job.progress().state
        assert value == seconds[index]
        seen.append(index)
    assert state_at_first == "running", "the first results came only with the final outcome"
    assert sorted(seen) == list(range(40))
    assert job.progress().state == "SUCCESS"


def test_as_completed_reports_failures_as_failure_values(worker: LocalWorker) -> None:
    job = fanout.submit(userjobs.triple, [1, "x", 3], batch_size=1)
    found = dict(job.as_completed(timeout=60))
    assert found[0] == 3 and found[2] == 9
    failure = found[1]
    assert isinstance(failure, fanout.Failure) and failure.index == 1 and "TypeError" in failure.error


def test_a_job_is_found_again_by_its_id_from_anywhere(worker: LocalWorker) -> None:
    job = fanout.submit(userjobs.sleepy, [0.2] * 6, batch_size=1)
    again = fanout.Job.attach(job.id)
    assert (again.id, again.total, again.batches, again.task) == (job.id, 6, 6, "tests.userjobs.sleepy")
    assert again.progress().state in ("running", "SUCCESS")
    outcome = again.wait(timeout=60)
    assert outcome.results == [0.2] * 6
    with pytest.raises(fanout.UnknownJob):
        fanout.Job.attach("no-such-job")


# --- the CLI: fanout map ----------------------------------------------------------------


def jsonl(values: list[object]) -> str:
    return "".join(json.dumps(v) + "\n" for v in values)


def test_cli_map_over_100000_items_prints_json_lines_in_input_order(
    cli_env: dict[str, str], worker: LocalWorker
) -> None:
    values: list[object] = list(range(100_000))
    values[5] = "five"
    proc = run_cli(cli_env, "map", "tests.userjobs:triple", "--input", "-", stdin=jsonl(values))
    assert proc.returncode == 1, proc.stderr  # one item failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 100_000
    assert lines[4] == {"index": 4, "result": 12}
    assert lines[5] == {"index": 5, "error": "TypeError: expected an int, got str"}
    assert [line["index"] for line in lines] == list(range(100_000))
    assert "failed item 5" in proc.stderr


def test_cli_map_with_reduce_prints_the_reduced_value(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(
        cli_env,
        "map",
        "tests.userjobs:triple",
        "--input",
        "-",
        "--reduce",
        "tests.userjobs:total",
        stdin=jsonl([1, 2, 3]),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"sum": 18, "failed": []}
    proc = run_cli(
        cli_env,
        "map",
        "tests.userjobs:triple",
        "--input",
        "-",
        "--reduce",
        "tests.userjobs:total",
        "--json",
        stdin=jsonl([1, 2, 3]),
    )
    document = json.loads(proc.stdout)
    assert document["results"] == [3, 6, 9] and document["reduced"] == {"sum": 18, "failed": []}


def test_cli_map_stream_prints_every_index_once(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(
        cli_env, "map", "tests.userjobs:triple", "--input", "-", "--stream", "--batch-size", "3",
        stdin=jsonl([*range(20), "x"]),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(21))
    by_index = {line["index"]: line for line in lines}
    assert by_index[7] == {"index": 7, "result": 21}
    assert "TypeError" in by_index[20]["error"]


def test_cli_map_exits_3_when_no_worker_has_the_task(cli_env: dict[str, str], worker: LocalWorker) -> None:
    proc = run_cli(cli_env, "map", "tests.test_api:nowhere", "--input", "-", stdin="1\n")
    assert proc.returncode == 3
    assert "no worker has task tests.test_api.nowhere (set FANOUT_IMPORTS on the workers" in proc.stderr


def test_cli_map_no_wait_then_status(cli_env: dict[str, str], worker: LocalWorker) -> None:
    sent = run_cli(cli_env, "map", "tests.userjobs:triple", "--input", "-", "--no-wait", stdin=jsonl([1, 2]))
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.strip()
    shown = run_cli(cli_env, "status", job_id, "--wait", "--timeout", "60")
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line) for line in shown.stdout.splitlines()] == [
        {"index": 0, "result": 3},
        {"index": 1, "result": 6},
    ]


# --- the example --------------------------------------------------------------------------


def test_the_wordcount_example_folds_the_lines_of_its_files(
    cli_env: dict[str, str], worker: LocalWorker, tmp_path: Path
) -> None:
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text("the cat and the hat\n\nThe end. THE END!\n")
    (texts / "sub" / "c.txt").write_text("a cat's life\n")
    proc = subprocess.run(
        [sys.executable, "-m", "examples.wordcount", str(texts / "a.txt"), str(texts / "sub" / "c.txt")],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "4 lines, 12 words (8 distinct)"
    assert lines[1].split() == ["4", "the"]
    assert lines[2].split() == ["2", "end"]


def test_fanout_worker_imports_the_users_modules_and_registers_them(tmp_path: Path, quiet_url: str) -> None:
    from orchestrator.discovery import list_workers
    from tests.faultkit import app_for

    url = quiet_url
    app = app_for(url)
    env = {**os.environ, "FANOUT_REDIS_URL": url}
    env.pop("FANOUT_IMPORTS", None)
    with open(tmp_path / "worker.log", "wb") as log:
        process = subprocess.Popen(
            fanout_command("worker", "--import", "tests.userjobs", "-c", "1", "--hostname", "cli@%h"),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (found := [w for w in list_workers(app) if w.name.startswith("cli@")]):
            assert process.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "fanout worker never registered"
            time.sleep(0.1)
        assert found[0].concurrency == 1
        assert {"tests.userjobs.triple", "fanout.double_batch"} <= set(found[0].tasks)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        app.backend.client.close()
        app.close()
