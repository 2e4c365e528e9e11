"""Detach and come back: ``--no-wait``, ``fanout status JOB_ID``, and a timeout that names the job."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.local import LocalWorker
from tests.conftest import fanout_command

pytestmark = pytest.mark.system


def run_cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fanout_command(*args), env=env, capture_output=True, text=True, timeout=timeout)


def test_no_wait_prints_the_job_id_and_status_wait_brings_the_results(
    cli_env: dict[str, str], worker: LocalWorker
) -> None:
    sent = run_cli(cli_env, "double", "--range", "2000", "--no-wait", "--json")
    assert sent.returncode == 0, sent.stderr
    doc = json.loads(sent.stdout)
    job_id = doc["job_id"]
    assert (doc["task"], doc["total"]) == ("double", 2000)
    waited = run_cli(cli_env, "status", job_id, "--wait", "--json", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    result = json.loads(waited.stdout)
    assert result["job_id"] == job_id and result["results"] == [2 * i for i in range(2000)]
    again = run_cli(cli_env, "status", job_id, "--json")  # finished: the same results, from Redis
    assert again.returncode == 0 and json.loads(again.stdout)["results"] == result["results"]
    text = run_cli(cli_env, "status", job_id)
    assert text.returncode == 0 and text.stdout.split()[:3] == ["0", "2", "4"]


def test_a_timeout_names_the_job_so_the_user_can_come_back(
    cli_env: dict[str, str], worker: LocalWorker
) -> None:
    timed_out = run_cli(cli_env, "double", "--range", "200000", "--timeout", "0.01")
    assert timed_out.returncode == 3
    assert "timed out" in timed_out.stderr and "fanout status" in timed_out.stderr
    job_id = timed_out.stderr.split("fanout status ")[1].split()[0].strip("`")
    waited = run_cli(cli_env, "status", job_id, "--wait", "--json", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["succeeded"] == 200_000
