"""Fixtures: a real Redis on a dedicated database and real ``celery worker`` processes.

The test Redis comes from FANOUT_TEST_REDIS_URL (default database 15 on the
local Redis).  It is flushed before and after the session.  Without a Redis,
the system tests are skipped on a laptop but fail under CI (CI=true).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

TEST_REDIS_URL = os.environ.get("FANOUT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Before anything imports the Celery app: the settings are read once.
os.environ["FANOUT_REDIS_URL"] = TEST_REDIS_URL
for _name in ("FANOUT_BROKER_URL", "FANOUT_RESULT_BACKEND"):
    os.environ.pop(_name, None)

from celery import Celery  # noqa: E402

from orchestrator.local import LocalWorker  # noqa: E402


def _redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    if not _redis_answers():
        message = f"no Redis at {TEST_REDIS_URL} (set FANOUT_TEST_REDIS_URL)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def app(redis_client: redis.Redis) -> Celery:
    from workers.app import app

    return app


@pytest.fixture(scope="session")
def worker(app: Celery, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorker]:
    """One real ``celery -A workers worker`` with two pool processes, for the whole session."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    local = LocalWorker(app, concurrency=2, name="test-worker", log_path=str(log))
    local.start(timeout=60)
    yield local
    local.stop()
    if local.process is not None and local.process.returncode not in (0, None):
        sys.stderr.write(log.read_text(errors="replace")[-4000:])


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running the ``fanout`` command as a subprocess against the test Redis."""
    env = dict(os.environ)
    env["FANOUT_REDIS_URL"] = TEST_REDIS_URL
    return env


def fanout_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A directory of six sample photos, one of them portrait through EXIF orientation."""
    from orchestrator.samples import make_photo

    directory = tmp_path / "photos"
    for i in range(6):
        make_photo(directory / f"p{i}.jpg", (800, 600), seed=i, orientation=6 if i == 3 else None)
    return directory
