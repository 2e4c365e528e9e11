"""Finding workers without a broadcast: registrations in Redis that stay truthful when a worker dies."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from orchestrator.discovery import list_workers
from orchestrator.local import LocalWorker
from tests.conftest import fanout_command
from tests.faultkit import app_for
from workers.registration import TTL_S

pytestmark = pytest.mark.system


@pytest.fixture
def lone_worker(tmp_path: Path, quiet_url: str) -> Iterator[tuple[LocalWorker, str]]:
    """One worker on a Redis no other worker uses (the tests' spare one), killed afterwards."""
    app = app_for(quiet_url)
    env = {**os.environ, "FANOUT_REDIS_URL": quiet_url}
    local = LocalWorker(app, 1, "lone", env, str(tmp_path / "lone.log"))
    local.start(timeout=60)
    try:
        yield local, quiet_url
    finally:
        if local.process is not None and local.process.poll() is None:
            os.killpg(local.process.pid, signal.SIGKILL)
            local.process.wait(10)
        app.backend.client.close()
        app.close()


def test_a_worker_killed_without_warning_drops_out_within_the_registration_ttl(
    lone_worker: tuple[LocalWorker, str], cli_env: dict[str, str]
) -> None:
    local, url = lone_worker
    assert [w.name for w in list_workers(local.app)] == [local.hostname]
    assert local.process is not None
    os.killpg(local.process.pid, signal.SIGKILL)
    local.process.wait(10)
    killed = time.monotonic()
    while any(w.name == local.hostname for w in list_workers(local.app)):
        assert time.monotonic() - killed <= TTL_S + 0.5, "a dead worker is still listed"
        time.sleep(0.1)
    env = dict(cli_env, FANOUT_REDIS_URL=url)
    proc = subprocess.run(fanout_command("double", "1"), env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "no worker is running" in proc.stderr


def test_a_warm_shutdown_removes_the_registration_at_once(lone_worker: tuple[LocalWorker, str]) -> None:
    local, _ = lone_worker
    local.stop()
    assert local.hostname not in {w.name for w in list_workers(local.app)}


class Counting:
    """A Redis client that counts the commands it is asked to run."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        self.calls.append(name)
        return getattr(self.client, name)


def test_discovery_is_two_reads_not_a_broadcast(lone_worker: tuple[LocalWorker, str]) -> None:
    local, _ = lone_worker
    counting = Counting(local.app.backend.client)
    probe = SimpleNamespace(backend=SimpleNamespace(client=counting))
    found = list_workers(probe)
    assert [w.name for w in found] == [local.hostname] and found[0].concurrency == 1
    assert "fanout.double_batch" in found[0].tasks and found[0].queues == ("fanout",)
    assert counting.calls == ["smembers", "mget"]
