"""Fixtures: a real Redis on a dedicated database and real ``celery worker`` processes.

The Redis databases the tests touch are named here and nowhere else:

* ``TEST_REDIS_URL``, from FANOUT_TEST_REDIS_URL (default database 15 on the
  local Redis): the session's worker and most tests.  It is flushed before and
  after the session.  Without a Redis there, the system tests are skipped on a
  laptop but fail under CI (CI=true).
* ``quiet_url``: a Redis no worker listens on, for tests that need one (no worker
  answers, messages that must stay queued, a state that must vanish).  It is a
  ``redis-server`` of the session's own on a free loopback port, so flushing it
  can never touch anyone else's data, as a neighbouring database number could.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

TEST_REDIS_URL = os.environ.get("FANOUT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Before anything imports the Celery app: the settings are read once.
os.environ["FANOUT_REDIS_URL"] = TEST_REDIS_URL
for _name in ("FANOUT_BROKER_URL", "FANOUT_RESULT_BACKEND"):
    os.environ.pop(_name, None)

from celery import Celery  # noqa: E402

from orchestrator.local import LocalWorker  # noqa: E402

if TYPE_CHECKING:
    from tests.faultkit import RedisServer

#: Task modules of "users" (outside the fanout package) that the session's worker imports.
USER_MODULES = "tests.userjobs,examples.wordcount"


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
def spare_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``redis-server`` of the session's own, on a free loopback port: the URL of its database 0."""
    from tests.faultkit import RedisServer

    if shutil.which("redis-server") is None:
        message = "no redis-server to start a Redis of the tests' own"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("spare-redis"), persistent=False).start()
    yield server.url
    server.stop()


@pytest.fixture
def quiet_url(spare_redis: str) -> Iterator[str]:
    """A Redis that no worker listens on (unless the test starts one), empty before and after the test."""
    client = redis.Redis.from_url(spare_redis)
    client.flushdb()
    yield spare_redis
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def app(redis_client: redis.Redis) -> Celery:
    from workers.app import app

    return app


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto) on a free loopback port, and the standard AWS variables for it.

    The variables are set in this process too, for the orchestrator side.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "fanout-test-key",
        "AWS_SECRET_ACCESS_KEY": "fanout-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env
    server.stop()


@pytest.fixture(scope="session")
def worker(
    app: Celery, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalWorker]:
    """One real ``celery -A workers worker`` with two pool processes, for the whole session.

    It reaches the test S3 server through the standard AWS variables.
    """
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    # The user's task modules, loaded as a user's workers load them.
    env = {**os.environ, **s3_env, "FANOUT_IMPORTS": USER_MODULES}
    local = LocalWorker(app, concurrency=2, name="test-worker", env=env, log_path=str(log))
    local.start(timeout=60)
    yield local
    local.stop()
    if local.process is not None and local.process.returncode not in (0, None):
        sys.stderr.write(log.read_text(errors="replace")[-4000:])


@pytest.fixture(autouse=True)
def _close_apps() -> Iterator[None]:
    """Close the apps a test made with ``tests.faultkit.app_for`` once it ends (after its other
    fixtures): a Redis socket left to the garbage collector would fail a later test."""
    yield
    from tests.faultkit import close_apps

    close_apps()


@pytest.fixture
def workers_started() -> Iterator[list[LocalWorker]]:
    """Workers a test starts; whatever is left of them is stopped, then killed, afterwards."""
    from tests.faultkit import kill_all

    started: list[LocalWorker] = []
    yield started
    for local in started:
        local.stop(timeout=10)
        kill_all(local)


@pytest.fixture
def start_worker(workers_started: list[LocalWorker], tmp_path: Path) -> Callable[..., LocalWorker]:
    """``start_worker(app, queue, name, env=None, concurrency=2)``: a started worker that also knows
    the rigged tasks and consumes only ``queue`` (its log ``tmp_path/NAME.log``), stopped after the test."""
    from tests.faultkit import worker

    def start(
        app: Celery, queue: str, name: str, env: Mapping[str, str] | None = None, concurrency: int = 2
    ) -> LocalWorker:
        local = worker(app, queue, tmp_path, name, env=env, concurrency=concurrency)
        workers_started.append(local)
        return local

    return start


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A ``redis-server`` of the test's own, which the test may stop and start again: with AOF
    (every write fsynced) when parametrized ``True`` (``indirect=["own_redis"]``), else without."""
    from tests.faultkit import RedisServer

    server = RedisServer(tmp_path / "redis", persistent=bool(getattr(request, "param", False))).start()
    yield server
    server.stop()


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """An empty directory where each run of a rigged item leaves a file (``tests/faulty.py``)."""
    directory = tmp_path / "marks"
    directory.mkdir()
    return directory


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running the ``fanout`` command as a subprocess against the test Redis.

    Taken when the test runs, so it carries the S3 variables once ``s3_env`` has set them.
    """
    env = dict(os.environ)
    env["FANOUT_REDIS_URL"] = TEST_REDIS_URL
    return env


def fanout_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def marked(pixel: object) -> bool:
    """Whether a contact-sheet pixel is the failure marker's red (the pages are JPEG: near, not equal)."""
    from workers.contact_sheet import MARKER

    assert isinstance(pixel, tuple)
    return all(abs(int(a) - b) <= 40 for a, b in zip(pixel, MARKER, strict=True))


def marked_cells(sheet: Path, images: int) -> list[int]:
    """The cells of a one-page contact sheet of ``images`` images that hold the failure marker."""
    from PIL import Image

    from workers.contact_sheet import CELL, cell_origin, columns_for

    with Image.open(sheet) as page:  # each cell's centre
        corners = (cell_origin(index, columns_for(images)) for index in range(images))
        half = CELL // 2
        return [i for i, (x, y) in enumerate(corners) if marked(page.getpixel((x + half, y + half)))]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A directory of six sample photos, one of them portrait through EXIF orientation."""
    from orchestrator.samples import make_photo

    directory = tmp_path / "photos"
    for i in range(6):
        make_photo(directory / f"p{i}.jpg", (800, 600), seed=i, orientation=6 if i == 3 else None)
    return directory


@pytest.fixture
def by_ref_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Jobs of more than 100 items sent from this process go by reference (an iterator of
    them streams), their results under ``tmp_path/results``: the path returned."""
    from workers.settings import get_settings

    root = tmp_path / "results"
    monkeypatch.setenv("FANOUT_BY_REFERENCE_ITEMS", "100")
    monkeypatch.setenv("FANOUT_RESULTS_URL", str(root))
    get_settings.cache_clear()
    yield root
    monkeypatch.undo()
    get_settings.cache_clear()
