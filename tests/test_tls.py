"""TLS as docs/deploy.md gives it: a TLS-only ``redis-server``, a CA of the test's own, verification required.

The URL is the documented one (``ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=...``): the
same string serves kombu's broker, Celery's result backend and fanout's own clients.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import builtin
from orchestrator.follow import wait
from orchestrator.local import LocalWorker
from orchestrator.send import publish
from tests.conftest import fanout_command
from tests.redisnodes import Certificates, Node, app_for_env, fanout_env, map_command, start_worker, tls_redis

pytestmark = pytest.mark.system


def tls_url(node: Node, ca: Path, reqs: str = "CERT_REQUIRED") -> str:
    return f"rediss://127.0.0.1:{node.port}/0?ssl_cert_reqs={reqs}&ssl_ca_certs={ca}"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs openssl and redis-server")
    return Certificates.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_node(certificates: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = tls_redis(tmp_path_factory.mktemp("tls-redis"), certificates)
    yield node
    node.kill()


@pytest.fixture(scope="module")
def tls_worker(
    tls_node: Node, certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalWorker]:
    env = fanout_env({"FANOUT_REDIS_URL": tls_url(tls_node, certificates.ca)})
    local = start_worker(env, tmp_path_factory.mktemp("tls-worker") / "worker.log", "tls")
    yield local
    local.stop()


def test_the_tls_redis_refuses_plain_connections(tls_node: Node) -> None:
    """The server under test speaks TLS only: a job that works below went through TLS."""
    import redis

    plain = redis.Redis(host="127.0.0.1", port=tls_node.port, socket_connect_timeout=2, socket_timeout=2)
    with pytest.raises(redis.RedisError):
        plain.ping()
    plain.close()


def test_a_job_through_the_cli_over_tls(
    tls_node: Node, certificates: Certificates, tls_worker: LocalWorker
) -> None:
    env = fanout_env({"FANOUT_REDIS_URL": tls_url(tls_node, certificates.ca)})
    proc = subprocess.run(
        fanout_command("double", "--json", "1", "2", "3"), env=env, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"] == [2, 4, 6]


@pytest.mark.parametrize("reqs", ["required", "CERT_REQUIRED"])
def test_a_job_through_fanout_map_over_tls(
    tls_node: Node, certificates: Certificates, tls_worker: LocalWorker, reqs: str
) -> None:
    env = fanout_env({"FANOUT_REDIS_URL": tls_url(tls_node, certificates.ca, reqs)})
    proc = subprocess.run(map_command(500, 50, 60), env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"results": [3 * i for i in range(500)], "errors": 0}


def test_a_worker_over_tls_runs_a_chord_sent_in_process(
    tls_node: Node, certificates: Certificates, tls_worker: LocalWorker
) -> None:
    app = app_for_env({"FANOUT_REDIS_URL": tls_url(tls_node, certificates.ca)})
    job = publish(app, builtin.double(list(range(1000))), 100)
    outcome = wait(app, job, timeout=60)
    assert outcome["results"] == [2 * i for i in range(1000)]
    assert outcome["failed"] == 0


def test_a_wrong_ca_exits_3_at_once_naming_the_certificate(
    tls_node: Node, certificates: Certificates
) -> None:
    env = fanout_env({"FANOUT_REDIS_URL": tls_url(tls_node, certificates.wrong_ca)})
    began = time.monotonic()
    proc = subprocess.run(
        fanout_command("double", "1", "2", "3"), env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - began
    assert proc.returncode == 3, proc.stderr
    assert "certificate verify failed" in proc.stderr
    assert f"127.0.0.1:{tls_node.port}" in proc.stderr
    # The interpreter's start and fanout's imports included; the check itself is one handshake.
    assert elapsed < 5, f"took {elapsed:.1f} s"
    print(f"wrong CA: exit 3 after {elapsed:.2f} s")
