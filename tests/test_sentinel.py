"""Redis through Sentinel, end to end: a master, a replica and three Sentinels, each a real ``redis-server``.

Everything goes through the ``sentinel://`` URL alone: the CLI, ``fanout.map``, the
workers (broker, result backend, registration), discovery and status.  Then the
group loses a Sentinel, then its replica, and jobs still run; and in a group of its
own the master is killed (``kill -9``) while two jobs run, and both ride out the failover.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.discovery import list_workers
from orchestrator.local import LocalWorker
from orchestrator.publish import bulk_queue_key
from orchestrator.samples import make_photos
from tests.conftest import fanout_command
from tests.redisnodes import (
    Certificates,
    SentinelGroup,
    app_for_env,
    fanout_env,
    map_command,
    sentinel_group,
    start_worker,
)
from workers import connections
from workers.settings import Settings

pytestmark = pytest.mark.system


def run(command: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    with sentinel_group(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


@pytest.fixture(scope="module")
def env(group: SentinelGroup) -> dict[str, str]:
    return fanout_env(group.env())


@pytest.fixture(scope="module")
def ha_worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorker]:
    local = start_worker(env, tmp_path_factory.mktemp("sentinel-worker") / "worker.log", "sentinel")
    yield local
    local.stop()


def cli_job_runs(env: dict[str, str]) -> None:
    proc = run(fanout_command("double", "--json", "--batch-size", "2", "1", "2", "3", "4", "5"), env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"] == [2, 4, 6, 8, 10]


def map_job_runs(env: dict[str, str], items: int = 2000) -> None:
    proc = run(map_command(items, 100, 90), env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"results": [3 * i for i in range(items)], "errors": 0}


def test_fanouts_own_client_finds_the_master_through_the_sentinels(group: SentinelGroup) -> None:
    settings = Settings.from_env(group.env())
    assert settings.uses_sentinel
    client = connections.client(settings.result_backend, settings)
    try:
        assert client.ping()
        info = client.info("replication")
        assert info["role"] == "master"
        assert client.connection_pool.get_master_address() == ("127.0.0.1", group.master_port())  # type: ignore[attr-defined]
    finally:
        connections.close(client)


def test_a_job_through_the_cli_via_sentinel(env: dict[str, str], ha_worker: LocalWorker) -> None:
    cli_job_runs(env)


def test_a_job_through_fanout_map_via_sentinel(env: dict[str, str], ha_worker: LocalWorker) -> None:
    map_job_runs(env)


def test_registration_discovery_publishing_and_status_via_sentinel(
    group: SentinelGroup, env: dict[str, str], ha_worker: LocalWorker
) -> None:
    app = app_for_env(group.env())
    assert ha_worker.hostname in {w.name for w in list_workers(app)}
    # Bulk publishing frames messages with kombu's Redis channel helpers: the Sentinel channel has them.
    assert bulk_queue_key(app, "fanout.double_batch") == "fanout"
    proc = run(fanout_command("double", "--no-wait", "7", "8"), env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[-1]
    status = run(fanout_command("status", "--wait", "--timeout", "60", "--json", job_id), env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["results"] == [14, 16]
    # The master holds the job; the replica has it too (what a failover would keep).
    master = group.node_on(group.master_port()).client()
    assert master.exists(f"fanout:job:{job_id}")


def test_a_sentinel_lost_jobs_still_run(
    group: SentinelGroup, env: dict[str, str], ha_worker: LocalWorker
) -> None:
    """The first Sentinel in the URL is gone: clients and workers ask the next one."""
    group.sentinels[0].kill()
    began = time.monotonic()
    cli_job_runs(env)
    map_job_runs(env)
    print(f"a Sentinel lost: a CLI job and a map job took {time.monotonic() - began:.1f} s")


def test_the_replica_lost_jobs_still_run(
    group: SentinelGroup, env: dict[str, str], ha_worker: LocalWorker
) -> None:
    replica = group.redis[1]
    assert replica.port != group.master_port()
    replica.kill()
    began = time.monotonic()
    cli_job_runs(env)
    map_job_runs(env)
    print(f"the replica lost: a CLI job and a map job took {time.monotonic() - began:.1f} s")
    assert ha_worker.process is not None and ha_worker.process.poll() is None


# --- the master lost: a failover while two jobs run ------------------------------------------

#: The default time limit (30 s, soft 20 s), and a visibility timeout short enough that a
#: message the failover strands in a worker's hands comes back within the test's bound
#: (clients and workers share them).  A shorter time limit lets a batch's soft limit fire
#: while its chord waits out the failover (see docs/failures.md).
FAILOVER_SETTINGS = {"FANOUT_VISIBILITY_TIMEOUT": "40", "FANOUT_RESTORE_INTERVAL": "1"}
ITEMS = 100_000
#: kombu 5.7 acknowledging a message on a channel whose connection is already closed (the
#: worker's main process exits); seen in about 1 run in 6 of the failover test.
KOMBU_ACK_CRASH = "Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")"


def xfail_if_kombu_crashed(workers: list[LocalWorker], then: str) -> None:
    """xfail if a worker died, each of kombu's ack on a closed Sentinel channel (KOMBU_ACK_CRASH):
    the known crash docs/failures.md describes, seen about once in six failovers."""
    crashed = [w for w in workers if w.process is not None and w.process.poll() is not None]
    if crashed and all(KOMBU_ACK_CRASH in Path(w.log_path or "").read_text() for w in crashed):
        pytest.xfail(
            f"{len(crashed)} of {len(workers)} workers died of kombu's ack on a closed Sentinel "
            f"channel ({KOMBU_ACK_CRASH}) {then}: see docs/failures.md"
        )


IMAGES = 500


def marked(marks: Path) -> Counter[int]:
    """How many times each item ran, from the mark task's per-process files."""
    runs: Counter[int] = Counter()
    for log in marks.iterdir():
        runs.update(int(line) for line in log.read_text().split())
    return runs


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def test_the_master_killed_mid_job_both_jobs_complete_after_the_failover(tmp_path: Path) -> None:
    """``kill -9`` of the master while a 100,000-item map and a 500-image resize run: Sentinel
    promotes the replica, both waiting clients ride it out, workers reconnect by themselves,
    and every index comes back exactly once."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    photos = tmp_path / "photos"
    make_photos(photos, IMAGES, size=(320, 240))
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    with sentinel_group(tmp_path / "ha") as group:
        env = fanout_env(group.env() | FAILOVER_SETTINGS)
        workers = [start_worker(env, tmp_path / f"worker{i}.log", f"failover{i}") for i in range(2)]
        clients: list[subprocess.Popen[str]] = []
        try:
            mapping = map_command(ITEMS, 500, 300, "tests.hajobs:mark", {"marks": str(marks)})
            resizing = fanout_command(
                "resize", str(photos), "--out", str(out), "--max-side", "32", "--no-contact-sheet",
                "--json", "--batch-size", "2", "--timeout", "300",
            )  # fmt: skip
            settings = Settings.from_env(env)
            redis_client = connections.client(settings.result_backend, settings)

            def sent() -> int:
                return sum(1 for _ in redis_client.scan_iter("fanout:job:*"))

            # The map first; once a tenth of its items ran, the resize, whose batches queue
            # behind the map's: at the kill one job is running and the other waits in Redis.
            popen = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
            clients.append(subprocess.Popen(mapping, **popen))  # type: ignore[call-overload]
            wait_until(lambda: sum(marked(marks).values()) >= ITEMS // 10, "the map to get going", 120)
            clients.append(subprocess.Popen(resizing, **popen))  # type: ignore[call-overload]
            wait_until(lambda: sent() == 2 or clients[1].poll() is not None, "the resize to be sent", 60)
            connections.close(redis_client)
            assert all(c.poll() is None for c in clients), "a job finished before the master was killed"

            old = group.master_port()
            group.node_on(old).kill()
            killed = time.monotonic()
            failover_s = group.wait_for_new_master(old, timeout=60)

            (map_out, map_err), (resize_out, resize_err) = (c.communicate(timeout=360) for c in clients)
            done_s = time.monotonic() - killed
            if any(c.returncode for c in clients):
                xfail_if_kombu_crashed(workers, "and the jobs could not complete")

            assert clients[0].returncode == 0, map_err[-3000:]
            assert json.loads(map_out) == {"results": [2 * i for i in range(ITEMS)], "errors": 0}
            runs = marked(marks)
            assert set(runs) == set(range(ITEMS))
            twice = sum(1 for count in runs.values() if count > 1)

            assert clients[1].returncode == 0, (resize_err[-2000:], resize_out[-3000:])
            resized = json.loads(resize_out)
            assert (resized["total"], resized["failed"]) == (IMAGES, 0)
            assert sorted(Path(r["source"]).name for r in resized["results"]) == sorted(
                p.name for p in photos.iterdir()
            )
            assert len(list(out.glob("photo-*.jpg"))) == IMAGES  # the photos, not the contact sheet

            print(
                f"failover: new master named {failover_s:.1f} s after kill -9; both jobs done "
                f"{done_s:.1f} s after it; {twice} of {ITEMS} items ran twice"
            )
            # The workers reconnected by themselves: a new job runs, and both are listed again
            # (a worker's consumer retries the broker 2 s, then 4 s after the loss).
            cli_job_runs(env)
            app = app_for_env(env)

            def back() -> bool:
                return {w.hostname for w in workers} <= {w.name for w in list_workers(app)}

            deadline = time.monotonic() + 30
            while not back() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not back():
                xfail_if_kombu_crashed(workers, "and did not come back")
                raise AssertionError(
                    f"a worker did not come back within 30 s: {[w.hostname for w in workers]}"
                )
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
                    client.wait(10)
            for local in workers:
                local.stop()


# --- Sentinel with passwords and TLS everywhere ----------------------------------------------


def test_sentinels_with_their_own_password_and_tls_to_them_and_the_master(tmp_path: Path) -> None:
    """Redis's password in the URL, the Sentinels' own in FANOUT_SENTINEL_PASSWORD, TLS only
    (verified against the test's CA) to the Sentinels and the master; a wrong Sentinel password
    exits 3 at once, naming it."""
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    certificates = Certificates.make(tmp_path / "certs")
    options = {"tls": certificates, "password": "redis-pw", "sentinel_password": "sentinel-pw"}
    with sentinel_group(tmp_path / "ha", **options) as group:
        env = fanout_env(group.env())
        assert env["FANOUT_REDIS_URL"].startswith("sentinel://:redis-pw@127.0.0.1:")
        local = start_worker(env, tmp_path / "worker.log", "sentinel-tls")
        try:
            cli_job_runs(env)
            map_job_runs(env, 500)
        finally:
            local.stop()
        wrong = env | {"FANOUT_SENTINEL_PASSWORD": "not-it"}
        began = time.monotonic()
        proc = run(fanout_command("double", "1"), wrong)
        assert proc.returncode == 3, proc.stderr
        assert "FANOUT_SENTINEL_PASSWORD" in proc.stderr and "No master found" in proc.stderr
        assert "redis-pw" not in proc.stderr and "not-it" not in proc.stderr  # no password shown
        assert time.monotonic() - began < 10
