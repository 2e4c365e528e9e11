"""A real Prometheus (Debian's ``prometheus``) scrapes ``fanout exporter`` during a known job.

10,000 items of which 37 fail: PromQL through Prometheus's HTTP API returns
exactly those counts, saw a backlog while the job ran, and sees it at 0 after.
Skipped on a laptop without the binary; fails under CI (CI=true), where
.ci/run installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.local import LocalWorker
from tests.conftest import fanout_command
from tests.faultkit import free_port
from workers.settings import get_settings

pytestmark = pytest.mark.system

TASK = "tests.userjobs.multiples_fail"


def _binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "no `prometheus` binary (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(url)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture
def prometheus(cli_env: dict[str, str], worker: LocalWorker, tmp_path: Path) -> Iterator[str]:
    """``fanout exporter`` and a Prometheus scraping it every second; Prometheus's base URL."""
    binary = _binary()
    exporter_port, prometheus_port = free_port(), free_port()
    exporter_log = tmp_path / "exporter.log"
    exporter = _start(
        fanout_command("exporter", "--port", str(exporter_port), "--address", "127.0.0.1"),
        exporter_log,
        cli_env,
    )
    server: subprocess.Popen[bytes] | None = None
    try:  # from here on, whatever fails stops what was started
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "fanout",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                        }
                    ],
                }
            )
        )
        server_log = tmp_path / "prometheus.log"
        server = _start(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            server_log,
        )
        base = f"http://127.0.0.1:{prometheus_port}"
        _wait_for(f"http://127.0.0.1:{exporter_port}/metrics", exporter, exporter_log)
        _wait_for(f"{base}/-/ready", server, server_log)
        assert _poll(base, 'up{job="fanout"}', lambda v: v == [1.0], 60), server_log.read_text()[-3000:]
        yield base
    finally:
        if server is not None:
            _stop(server)
        _stop(exporter)


def query(base: str, expr: str) -> list[float]:
    """The values of the instant vector ``expr`` now."""
    doc = json.loads(_get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"))
    assert doc["status"] == "success", doc
    return sorted(float(sample["value"][1]) for sample in doc["data"]["result"])


def _poll(base: str, expr: str, ok: object, timeout: float) -> bool:
    """Whether ``ok(values of expr)`` held before ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok(query(base, expr)):  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def test_prometheus_counts_exactly_the_items_of_a_job_and_sees_its_backlog_drain(prometheus: str) -> None:
    import fanout
    from tests import userjobs

    queue = get_settings().queue
    # 200 batches of 50 items, a millisecond each: about 5 s on the session's 2 processes,
    # so Prometheus scrapes the backlog while it is there.
    outcome = fanout.map(
        userjobs.multiples_fail,
        range(10_000),
        kwargs={"of": 271, "seconds": 0.001},
        batch_size=50,
        timeout=120,
    )
    assert (outcome.succeeded, outcome.failed) == (9_963, 37)
    name = f'name="{TASK}"'
    checks = {
        f"sum(fanout_items_succeeded_total{{{name}}})": [9_963.0],
        f"sum(fanout_items_failed_total{{{name}}})": [37.0],
        f'fanout_items_failed_total{{{name},exception="LookupError"}}': [37.0],
        f"fanout_batch_duration_seconds_count{{{name}}}": [200.0],
        f'fanout_queue_backlog{{queue_name="{queue}"}}': [0.0],
    }
    for expr, expected in checks.items():
        assert _poll(prometheus, expr, lambda v, e=expected: v == e, 30), (expr, query(prometheus, expr))
    # While the job ran, Prometheus saw batches waiting; none are left now.
    seen = query(prometheus, f'max_over_time(fanout_queue_backlog{{queue_name="{queue}"}}[5m])')
    assert seen and seen[0] > 0, seen
    assert query(prometheus, f'fanout_queue_length{{queue_name="{queue}"}}') == [0.0]
    assert query(prometheus, f'fanout_queue_reserved{{queue_name="{queue}"}}') == [0.0]
    assert query(prometheus, 'fanout_jobs{state="failed"}')[0] >= 1
