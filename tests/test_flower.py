"""System tests for the dashboard: the real Flower process, real workers, real Redis, a real browser.

Flower is started the way docker-compose.yml starts it (``celery -A workers flower``,
basic auth, read-only, offline workers purged) on a free port; a double chord, a
resize chord and one ``fanout.double`` run through the session's worker; then
Flower's REST API, its Prometheus metrics and its Tasks page in headless
Chromium must show them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from orchestrator import builtin
from orchestrator.follow import wait
from orchestrator.local import LocalWorker
from orchestrator.samples import make_photo
from orchestrator.send import publish
from tests.composefile import ENV_EXAMPLE, SECRETS, read_env_file, rendered
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.system

USER, PASSWORD = "fanout", "test-only-flower-password"
CHROMIUM = os.environ.get("FANOUT_CHROMIUM", "/usr/bin/chromium")
# As root, in a sandbox with no route out: no setuid sandbox, no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Distinctive inputs (7310000..7310011), so this module's tasks are told apart from any
# other in Flower's list.
MARKER = 7_310_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.3)


@dataclass
class Response:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Flower:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def request(
        self, path: str, credentials: tuple[str, str] | None = (USER, PASSWORD), method: str = "GET"
    ) -> Response:
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        if credentials:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Response(response.status, response.read().decode())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode(errors="replace"))

    def answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"flower exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return self.request("/healthcheck", None).body == "OK"
        except OSError:
            return False


@pytest.fixture(scope="module")
def flower(worker: LocalWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """Flower exactly as docker-compose.yml runs it (command and FLOWER_* settings), on a free port."""
    port = free_port()
    directory = tmp_path_factory.mktemp("flower")
    log = directory / "flower.log"
    compose = rendered(read_env_file(ENV_EXAMPLE) | SECRETS)["services"]["flower"]
    env = dict(os.environ, FANOUT_REDIS_URL=TEST_REDIS_URL)
    env |= {k: v for k, v in compose["environment"].items() if k.startswith("FLOWER_")}
    env["FLOWER_BASIC_AUTH"] = f"{USER}:{PASSWORD}"
    assert env["FLOWER_READ_ONLY"] == "true"
    # Only where it listens and keeps its state differ from the container.
    here = {"--address": "127.0.0.1", "--port": str(port), "--db": str(directory / "flower.db")}
    assert compose["command"][:4] == ["celery", "-A", "workers", "flower"]
    options = dict(arg.split("=", 1) for arg in compose["command"][4:])
    assert set(here) <= set(options), "docker-compose.yml's Flower command changed shape"
    args = [*compose["command"][:4], *(f"{name}={here.get(name, value)}" for name, value in options.items())]
    command = [sys.executable, "-m", *args]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Flower(f"http://127.0.0.1:{port}", process, log)
    try:
        until(running.answers, 60, "Flower to answer /healthcheck")
        # Flower has connected to the event stream once it has seen the worker's heartbeat.
        online = f'flower_worker_online{{worker="{worker.hostname}"}} 1.0'
        until(lambda: online in running.request("/metrics").body, 60, "Flower to see the worker online")
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@dataclass
class Run:
    double_job_id: str
    resize_job_id: str
    double_batches: int
    resize_sources: list[str]
    single_task_id: str
    resize_out: str  # the resize run's output directory, which its header tasks name


@pytest.fixture(scope="module")
def run(app: Celery, flower: Flower, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A double chord, a resize chord and one ``fanout.double``, all finished, while Flower watches."""
    values = list(range(MARKER, MARKER + 12))
    double_job = publish(app, builtin.double(values), 3)
    outcome = wait(app, double_job, timeout=60)
    assert outcome["results"] == [2 * v for v in values]

    directory = tmp_path_factory.mktemp("flower-photos")
    sources = [make_photo(directory / "in" / f"flower-{i}.jpg", (320, 240), seed=i) for i in range(2)]
    pairs = [(str(s), str(directory / "out" / s.name)) for s in sources]
    resize_job = publish(app, builtin.resize(pairs, 64, str(directory / "out")), 1)
    outcome = wait(app, resize_job, timeout=60)
    assert outcome["failed"] == 0

    single = app.signature("fanout.double", args=(MARKER,)).apply_async()
    assert single.get(timeout=30) == 2 * MARKER
    return Run(
        double_job.job_id,
        resize_job.job_id,
        double_job.batches,
        [str(s) for s in sources],
        single.id,
        str(directory / "out"),
    )


def flower_tasks(flower: Flower) -> dict[str, dict[str, Any]]:
    response = flower.request("/api/tasks?limit=10000")
    assert response.status == 200, response.body
    tasks: dict[str, dict[str, Any]] = response.json()
    return tasks


def run_tasks(flower: Flower, run: Run) -> dict[str, list[dict[str, Any]]]:
    """This run's tasks as Flower lists them, by task name."""
    found: dict[str, list[dict[str, Any]]] = {}
    for task_id, task in flower_tasks(flower).items():
        args = str(task.get("args"))
        ours = (
            task_id in (run.double_job_id, run.resize_job_id, run.single_task_id)
            # Header tasks are published with a short argsrepr: "(start, <n items>)".
            or (task.get("name") == "fanout.double_batch" and re.fullmatch(r"\((0|3|6|9), <3 items>\)", args))
            or (task.get("name") == "fanout.resize_items" and run.resize_out in args)
        )
        if ours:
            found.setdefault(str(task.get("name")), []).append(task | {"uuid": task_id})
    return found


def all_finished(flower: Flower, run: Run) -> dict[str, list[dict[str, Any]]] | None:
    found = run_tasks(flower, run)
    expected = {
        "fanout.double_batch": run.double_batches,
        "fanout.resize_items": len(run.resize_sources),
        "fanout.collect": 2,
        "fanout.double": 1,
    }
    counts = {name: sum(t["state"] == "SUCCESS" for t in found.get(name, [])) for name in expected}
    return found if counts == expected else None


def test_flower_lists_the_worker(flower: Flower, worker: LocalWorker) -> None:
    response = flower.request("/api/workers?refresh=1")
    assert response.status == 200, response.body
    workers = response.json()
    assert worker.hostname in workers
    assert workers[worker.hostname]["stats"]["pool"]["max-concurrency"] == 2


def test_flower_shows_the_runs_tasks_with_names_and_final_states(flower: Flower, run: Run) -> None:
    found = until(lambda: all_finished(flower, run), 30, "Flower to show every task of the run as SUCCESS")
    collects = {t["uuid"] for t in found["fanout.collect"]}
    assert collects == {run.double_job_id, run.resize_job_id}
    # Flower shows the argsrepr fanout publishes: (start, <n items>).
    starts = sorted(int(t["args"][1:].split(",")[0]) for t in found["fanout.double_batch"])
    assert starts == [0, 3, 6, 9]
    [single] = found["fanout.double"]
    assert single["uuid"] == run.single_task_id and single["result"] == str(2 * MARKER)


def test_flower_requires_credentials(flower: Flower) -> None:
    for path in ("/", "/tasks", "/api/workers", "/api/tasks", "/api/task/types"):
        assert flower.request(path, None).status == 401, path
        assert flower.request(path, (USER, "wrong")).status == 401, path
        assert flower.request(path).status == 200, path


def test_flower_metrics_count_the_runs_tasks(flower: Flower, run: Run, worker: LocalWorker) -> None:
    until(lambda: all_finished(flower, run), 30, "Flower to show every task of the run")
    # Flower serves /metrics without credentials (for Prometheus scrapers): keep it on loopback.
    metrics = flower.request("/metrics", None)
    assert metrics.status == 200
    counters = {}
    for line in metrics.body.splitlines():
        match = re.fullmatch(
            r'flower_events_total\{task="([^"]+)",type="([^"]+)",worker="([^"]+)"\} (\S+)', line
        )
        if match:
            counters[match[1], match[2], match[3]] = float(match[4])
    for name in ("fanout.double_batch", "fanout.resize_items", "fanout.collect", "fanout.double"):
        assert counters.get((name, "task-succeeded", worker.hostname), 0) >= 1, name
    assert counters[("fanout.double_batch", "task-succeeded", worker.hostname)] >= run.double_batches
    assert "flower_task_runtime_seconds_bucket" in metrics.body


def test_flower_is_read_only(flower: Flower, worker: LocalWorker, app: Celery) -> None:
    for path in ("/api/task/async-apply/fanout.double", f"/api/worker/shutdown/{worker.hostname}"):
        response = flower.request(path, method="POST")
        assert (response.status, response.body) == (403, "Read only mode is enabled"), path
    assert app.control.ping([worker.hostname], timeout=2), "the worker should still be running"


def test_browser_shows_the_runs_tasks_in_flowers_tasks_page(flower: Flower, run: Run, tmp_path: Path) -> None:
    if not shutil.which(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    until(lambda: all_finished(flower, run), 30, "Flower to show every task of the run")
    screenshot = Path(os.environ.get("FANOUT_FLOWER_SCREENSHOT") or tmp_path / "flower-tasks.png")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            # Without credentials the browser is refused (Chromium gives up on the 401 challenge)...
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                browser.new_page().goto(flower.url + "/tasks", timeout=30_000)
            # ...and with them it logs in and sees the run's tasks.
            context = browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD},
                viewport={"width": 1400, "height": 900},
            )
            page = context.new_page()
            response = page.goto(flower.url + "/tasks", timeout=30_000)
            assert response is not None and response.status == 200
            rows = page.locator("#tasks-table tbody tr")
            for name in ("fanout.double_batch", "fanout.resize_items", "fanout.collect"):
                rows.filter(has_text=name).first.wait_for(timeout=30_000)
            texts = rows.all_inner_texts()
            assert any("fanout.double_batch" in t and "SUCCESS" in t for t in texts)
            assert any("fanout.resize_items" in t and "SUCCESS" in t for t in texts)
            assert any(run.double_job_id in t and "fanout.collect" in t for t in texts)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=False)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
