"""``FANOUT_WAIT_REPLICAS``: the writes a job cannot do without wait (Redis WAIT) for a replica."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faultkit import RedisServer
from workers import backend
from workers.errors import ConfigError
from workers.settings import Settings


def test_wait_replicas_is_off_by_default_and_takes_zero_or_more() -> None:
    assert (Settings.from_env({}).wait_replicas, Settings.from_env({}).wait_ms) == (0, 100)
    settings = Settings.from_env({"FANOUT_WAIT_REPLICAS": "1", "FANOUT_WAIT_MS": "250"})
    assert (settings.wait_replicas, settings.wait_ms) == (1, 250)
    with pytest.raises(ConfigError, match="FANOUT_WAIT_REPLICAS"):
        Settings.from_env({"FANOUT_WAIT_REPLICAS": "-1"})
    with pytest.raises(ConfigError, match="FANOUT_WAIT_MS"):
        Settings.from_env({"FANOUT_WAIT_MS": "0"})


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "master", persistent=False).start()
    yield server
    server.stop()


def use(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setattr("workers.settings.get_settings", lambda: settings)
    monkeypatch.setattr(backend, "_late_logged_at", float("-inf"))


@pytest.mark.system
def test_a_write_waits_for_the_replica_and_a_missing_one_is_logged_not_raised(
    master: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use(monkeypatch, Settings(wait_replicas=1, wait_ms=200))
    client = redis.Redis(host=master.bind, port=master.port)
    caplog.set_level(logging.WARNING, logger="workers.backend")
    # No replica: the write stands, the wait ends within its bound, and says so in the log.
    client.set("k", "v")
    started = time.monotonic()
    backend.replicated(client, "a test write")
    assert time.monotonic() - started < 1.0
    assert "0 of 1 replica(s) had a test write within 200 ms" in caplog.text
    assert client.get("k") == b"v"
    # A replica: the wait returns once it has the write, and nothing is logged.
    replica = RedisServer(tmp_path / "replica", persistent=False).start()
    try:
        replica_client = redis.Redis(host=replica.bind, port=replica.port)
        replica_client.replicaof(master.bind, master.port)
        deadline = time.monotonic() + 30
        while (client.info("replication").get("slave0") or {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica never caught up"
            time.sleep(0.1)
        caplog.clear()
        monkeypatch.setattr(backend, "_late_logged_at", float("-inf"))
        client.set("k", "w")
        backend.replicated(client, "a test write")
        assert caplog.text == ""
        assert replica_client.get("k") == b"w"
        replica_client.close()
    finally:
        replica.stop()
        client.close()


def test_no_wait_is_sent_when_the_setting_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, Settings())

    class NoClient:
        def wait(self, *args: object) -> int:
            raise AssertionError("WAIT sent with FANOUT_WAIT_REPLICAS=0")

    backend.replicated(NoClient(), "anything")
