"""System tests: docker-compose.yml's redis and worker commands and healthchecks, run for real.

No Docker engine here, so each service's ``command`` runs as a local process with
the environment Compose would give it.  Redis: the password is required, the
healthcheck authenticates, AOF is on and nothing is evicted.  Worker: with
``HOSTNAME`` set as Docker sets it, its healthcheck passes for that node and
fails for another, and SIGTERM (what ``docker compose stop`` and scaling down
send) ends it with a warm shutdown within ``stop_grace_period``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.composefile import SECRETS, seconds, service
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.system


def healthcheck(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_compose_redis_requires_its_password_persists_and_never_evicts(tmp_path: Path) -> None:
    redis = service("redis")
    if not shutil.which("redis-server"):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("redis-server is not installed")
    shell, flag, script = redis["command"]
    assert (shell, flag) == ("sh", "-c")
    # The image's entrypoint drops root, then runs its arguments; here it only runs them.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker-entrypoint.sh").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "docker-entrypoint.sh").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}") | redis["environment"]
    # A free port and a private directory instead of the container's 6379 and /data volume.
    port = free_port()
    script += f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --save ''"
    kind, check = redis["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and check.startswith("redis-cli ")
    check = check.replace("redis-cli ", f"redis-cli -p {port} ", 1)
    process = subprocess.Popen(
        ["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )

    def cli(*args: str, auth: str | None = SECRETS["REDIS_PASSWORD"]) -> str:
        cli_env = {k: v for k, v in env.items() if k != "REDISCLI_AUTH"} | (
            {"REDISCLI_AUTH": auth} if auth else {}
        )
        return subprocess.run(
            ["redis-cli", "-p", str(port), *args], env=cli_env, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        deadline = time.monotonic() + 20
        while healthcheck(check, env).returncode != 0:
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "the redis healthcheck never passed"
            time.sleep(0.2)
        assert "NOAUTH" in cli("ping", auth=None)
        assert healthcheck(check, dict(env, REDISCLI_AUTH="wrong")).returncode != 0
        assert cli("config", "get", "maxmemory-policy").split() == ["maxmemory-policy", "noeviction"]
        assert cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
        assert cli("config", "get", "maxmemory").split() == ["maxmemory", str(2**30)]  # REDIS_MAXMEMORY=1gb
        assert cli("set", "chord-counter", "1") == "OK"
    finally:
        process.terminate()
        process.wait(10)
    assert list((tmp_path / "appendonlydir").glob("*.aof")), "no append-only file written"


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
