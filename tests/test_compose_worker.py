"""System test: docker-compose.yml's worker command and healthcheck, run for real (without Docker).

The worker service's ``command`` runs as a process against the test Redis, with
``HOSTNAME`` set as Docker sets it in a container; its healthcheck command must
pass for that node and fail for another, and SIGTERM (what ``docker compose
stop`` and scaling down send) must end it with a warm shutdown well within
``stop_grace_period``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.composefile import seconds, service
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.system


def healthcheck(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)


def test_compose_worker_passes_its_healthcheck_and_stops_warmly(
    app: Celery, redis_client: object, tmp_path: Path
) -> None:
    worker = service("worker")
    kind, check = worker["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # As in the image: the venv's bin on PATH (so `celery` is the project's), HOSTNAME set by Docker.
    env = dict(os.environ, FANOUT_REDIS_URL=TEST_REDIS_URL, HOSTNAME=socket.gethostname())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(worker["environment"] | {"FANOUT_REDIS_URL": TEST_REDIS_URL})
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            worker["command"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while (result := healthcheck(check, env)).returncode != 0:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"healthcheck never passed: {result.stdout}{result.stderr}"
            time.sleep(1)
        node = f"celery@{env['HOSTNAME']}"
        assert node in result.stdout

        stats = app.control.inspect([node], timeout=5).stats() or {}
        assert stats[node]["pool"]["max-concurrency"] == 2  # FANOUT_WORKER_CONCURRENCY's default

        # The same check for a node that is not there fails: it pings its own node only.
        elsewhere = healthcheck(check, dict(env, HOSTNAME="no-such-container"))
        assert elsewhere.returncode != 0

        process.send_signal(signal.SIGTERM)
        assert process.wait(seconds(worker["stop_grace_period"])) == 0
        assert "worker: Warm shutdown" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
