"""The command line in-process, with click's CliRunner: usage errors, exit codes and ``--json``
documents.  Subprocesses (tests/test_api.py, test_system.py) stay for real signals and a
fresh interpreter."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from celery import Celery
from click.testing import CliRunner, Result

from orchestrator.cli import main
from orchestrator.local import LocalWorker
from tests.faultkit import new_queue, rigged_job, send

system = pytest.mark.system


def fanout(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


def usage_error(result: Result, says: str) -> None:
    """Exit 2, a message naming the problem on stderr, nothing on stdout (nothing was sent)."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert says in result.stderr, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("double", "1", "2.5", "3"), "argument 2 ('2.5') is not an integer"),
        (("double",), "nothing to double: give NUMBERS, '-' or --range N"),
        (("double", "--range", "3", "1"), "give NUMBERS or --range, not both"),
        (("double", "-", "1"), "'-' (read stdin) cannot be mixed with NUMBERS"),
        (("double", "--batch-size", "0", "1"), "must be at least 1"),
        (("double", "--batch-size", "some", "1"), "neither 'auto' nor a whole number"),
        (("double", "--max-failures", "many", "1"), "max_failures must be a count (N) or a percentage (P%)"),
        (("double", "--max-failures", "150%", "1"), "max_failures must be a count (N) or a percentage (P%)"),
        (("double", "--timeout", "0", "1"), "--timeout"),
        (("resize", "a.jpg", "--out", "out"), "give a size: --size N|WxH (repeatable) or --max-side N"),
        (("resize", "a.jpg", "--out", "out", "--size", "12xx"), "neither N nor WxH"),
        (("resize", "a.jpg", "--out", "out", "--max-side", "9", "--background", "#zz"), "background:"),
        (("map", "json:dumps", "--input", "-"), "is not a fanout task: decorate it with @fanout.task"),
        (("map", "tests.userjobs", "--input", "-"), "expected MODULE:FUNCTION"),
        (("map", "tests.userjobs:triple", "--input", "-", "--stream", "--json"), "cannot be combined"),
        (("map", "tests.userjobs:triple", "--input", "-", "--kwargs", "[1]"), "--kwargs"),
        (("map", "tests.userjobs:triple", "--input", "-", "--reduce", "json:dumps"), "not a fanout task"),
        (("status",), "Missing argument 'JOB_ID'"),
    ],
)
def test_a_usage_error_exits_2_naming_the_problem_and_sends_nothing(args: tuple[str, ...], says: str) -> None:
    usage_error(fanout(*args, stdin="1\n"), says)


def test_map_names_the_line_of_its_input_that_is_not_json(tmp_path: Path) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text('1\n2\n{"a": \n4\n')
    usage_error(fanout("map", "tests.userjobs:triple", "--input", str(source)), "line 3 is not JSON")


def test_map_of_an_empty_input_is_a_usage_error() -> None:
    usage_error(fanout("map", "tests.userjobs:triple", "--input", "-", stdin=""), "--input holds no items")


def test_resize_of_a_directory_without_images_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    result = fanout("resize", str(tmp_path), "--out", str(tmp_path / "out"), "--max-side", "64")
    usage_error(result, "no images found in SOURCES")


@system
def test_status_of_an_unknown_job_exits_2_saying_it_may_have_expired(redis_client: object) -> None:
    result = fanout("status", str(uuid.uuid4()))
    assert result.exit_code == 2
    assert "no job" in result.stderr and "expired" in result.stderr


@system
def test_status_json_of_a_job_still_running_is_one_document(app: Celery) -> None:
    # A queue of its own that no worker consumes: the job cannot move.
    job = send(app, rigged_job(app, list(range(10)), 4, new_queue())).job
    result = fanout("status", job.job_id, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == {
        "job_id": job.job_id,
        "task": "double",
        "state": "running",
        "stopped": None,
        "total": 10,
        "batches": 3,
        "batches_done": 0,
        "items_done": 0,
        "items_pending": 10,
        "healed_batches": 0,
        "unhealable": None,
    }
    job.cancel()  # its queued batches reported cancelled: nothing left behind for the workers


@system
def test_a_run_json_document_holds_every_result_in_input_order_and_exits_0(worker: LocalWorker) -> None:
    result = fanout("double", "3", "-8", str(2**70), "--batch-size", "1", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["results"] == [6, -16, 2**71]
    assert (doc["total"], doc["succeeded"], doc["failed"], doc["errors"]) == (3, 3, 0, [])
    assert doc["task"] == "double" and doc["elapsed_s"] > 0


@system
def test_a_run_with_a_failed_item_exits_1_and_its_document_names_the_item(worker: LocalWorker) -> None:
    result = fanout("map", "tests.userjobs:triple", "--input", "-", "--json", stdin='1\n"x"\n3\n')
    assert result.exit_code == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["results"] == [3, None, 9] and doc["failed"] == 1
    [error] = doc["errors"]
    assert error["index"] == 1 and error["input"] == "x" and "TypeError" in error["error"]
