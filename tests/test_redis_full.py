"""A full Redis (``maxmemory``, ``noeviction``) mid-job: workers wait for room, the client names the cause.

Before issue 17, a job whose results filled Redis ended every worker with
``Unrecoverable error: OutOfMemoryError`` (kombu's record of a message it had
just taken, refused), losing that message, and the waiting client then said
"no worker is running ... Start a worker".  Here a ``redis-server`` of the
test's own gets a 16 MB limit, and a job's results are twice that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from celery import Celery

from orchestrator.local import LocalWorker
from orchestrator.plan import JobSpec, Plan
from orchestrator.room import footprint, full_redis_message
from tests.conftest import fanout_command
from tests.faultkit import QUICK, Built, RedisServer, app_for, kill_all, new_queue, rigged_job, send, worker
from workers.memory import RedisMemory, is_full

#: The test Redis's limit.
MAXMEMORY = 16 * 2**20
#: The job: 3,000 results of 8 KB (24 MB, half again the limit) in 200 batches.
ITEMS, RESULT_B, BATCH = 3_000, 8_192, 15
#: The waiting client gives up this long after the job stopped moving (10 s without
#: progress, then one look at Redis's INFO): measured from the fill, with a loaded machine's delays.
NAMED_WITHIN_S = 40
#: Once memory is freed, the job completes within this long (QUICK settings: a batch whose
#: report waited past the 4 s time limit is back on the queue within the 10 s visibility timeout).
CARRIES_ON_WITHIN_S = 40


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of the test's own, with a 16 MB maxmemory and noeviction, as compose runs it."""
    server = RedisServer(tmp_path / "redis", persistent=False).start()
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", MAXMEMORY)
    client.close()
    yield server
    server.stop()


def padded_job(url: str, queue: str) -> tuple[Celery, Built]:
    app = app_for(url)
    job = rigged_job(
        app, list(range(ITEMS)), BATCH, queue, task="fanout.test.padded", kwargs={"size": RESULT_B}
    )
    return app, job


@pytest.mark.system
@pytest.mark.timeout(300)
def test_a_full_redis_mid_job_keeps_workers_alive_names_maxmemory_and_the_job_completes_once_freed(
    full_redis: RedisServer, tmp_path: Path
) -> None:
    queue = new_queue()
    app, job = padded_job(full_redis.url, queue)
    env = {**QUICK, "FANOUT_REDIS_URL": full_redis.url}
    started: list[LocalWorker] = []
    client = redis.Redis.from_url(full_redis.url)
    try:
        started.append(worker(app, queue, tmp_path, "full-a", env=env))
        started.append(worker(app, queue, tmp_path, "full-b", env=env))
        # Sent while the workers are stopped (SIGSTOP): the header fits (about 1 MB), the
        # results will not, and the workers then fill Redis all at once.
        for local in started:
            assert local.process is not None
            os.killpg(local.process.pid, signal.SIGSTOP)
        try:
            group_id = send(app, job).group_id
        finally:
            for local in started:
                assert local.process is not None
                os.killpg(local.process.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        cli_env = {**os.environ, "FANOUT_REDIS_URL": full_redis.url}
        waiting = subprocess.run(
            fanout_command("status", job.job_id, "--wait", "--json", "--timeout", "200"),
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=NAMED_WITHIN_S + 60,
        )
        named_in = time.monotonic() - resumed_at
        # The client ends with exit 3 naming Redis's memory limit, not the workers.
        assert waiting.returncode == 3, waiting.stderr[-2000:]
        assert named_in <= NAMED_WITHIN_S
        message = waiting.stderr
        assert "Redis (broker and result backend) is full" in message and "maxmemory 16.0 MB" in message, (
            message
        )
        assert "noeviction" in message and job.job_id in message and "Start a worker" not in message
        assert "fanout status" in message and "Traceback" not in message
        # The workers are alive, and none of them gave up on a message.
        for local in started:
            assert local.process is not None and local.process.poll() is None
        logs = [(tmp_path / f"{name}.log").read_text(errors="replace") for name in ("full-a", "full-b")]
        assert not any("Unrecoverable error" in log for log in logs)
        assert any("Redis is full" in log for log in logs)
        # Memory is freed: the workers carry on by themselves and the job completes, every
        # index exactly once, every result right.
        client.config_set("maxmemory", 0)
        freed_at = time.monotonic()
        done = subprocess.run(
            fanout_command("status", job.job_id, "--wait", "--json", "--timeout", str(CARRIES_ON_WITHIN_S)),
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=CARRIES_ON_WITHIN_S + 30,
        )
        carried_on_in = time.monotonic() - freed_at
    finally:
        for local in started:
            local.stop(timeout=10)
            kill_all(local)
        client.close()
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout)
    assert (outcome["total"], outcome["succeeded"], outcome["failed"]) == (ITEMS, ITEMS, 0)
    assert outcome["results"] == [f"{i}:" + "x" * RESULT_B for i in range(ITEMS)]
    assert group_id
    # The figures docs/failures.md gives (pytest -s shows them).
    print(f"exit 3 {named_in:.1f} s after the workers resumed; done {carried_on_in:.1f} s after the freeing")


@pytest.mark.system
@pytest.mark.timeout(120)
def test_a_job_that_would_not_fit_is_refused_before_sending_with_exit_3(
    full_redis: RedisServer, tmp_path: Path
) -> None:
    app = app_for(full_redis.url)
    local = worker(app, "fanout", tmp_path, "fit", env={"FANOUT_REDIS_URL": full_redis.url}, concurrency=1)
    client = redis.Redis.from_url(full_redis.url)
    try:
        # Redis has about 300 KB left; the job's header alone is about 3 MB.
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 300_000)
        proc = subprocess.run(
            fanout_command("double", "--range", "100000", "--batch-size", "100"),
            env={**os.environ, "FANOUT_REDIS_URL": full_redis.url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        queued = client.llen("fanout")
        keys = list(client.keys("fanout:job:*"))
    finally:
        local.stop(timeout=10)
        kill_all(local)
        client.close()
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "would not fit in Redis" in line and "nothing was sent" in line
    assert "maxmemory" in line and "FANOUT_BY_REFERENCE_ITEMS" in line
    assert (queued, keys) == (0, [])


def test_the_full_redis_message_names_the_limit_the_policy_and_what_to_do() -> None:
    memory = RedisMemory(used=17_000_000, maxmemory=16 * 2**20, policy="noeviction")
    assert memory.refuses_writes and memory.free == 0
    line = full_redis_message("job-1", "result backend", memory, "60 of 200 batches done, 140 pending")
    assert line.startswith("job job-1 cannot finish: Redis (result backend) is full, ")
    assert "used_memory 16.2 MB of maxmemory 16.0 MB (maxmemory-policy noeviction)" in line
    assert "60 of 200 batches done, 140 pending" in line
    assert "CONFIG SET maxmemory" in line and "`fanout status job-1 --wait`" in line
    assert "\n" not in line


def test_a_redis_below_its_limit_or_evicting_or_unlimited_is_not_called_full() -> None:
    assert not RedisMemory(used=1_000_000, maxmemory=16 * 2**20, policy="noeviction").refuses_writes
    assert not RedisMemory(used=17_000_000, maxmemory=16 * 2**20, policy="allkeys-lru").refuses_writes
    unlimited = RedisMemory(used=17_000_000, maxmemory=0, policy="noeviction")
    assert not unlimited.refuses_writes and unlimited.free is None
    assert str(unlimited) == "used_memory 16.2 MB, no maxmemory"


def test_only_a_write_refused_for_memory_counts_as_full() -> None:
    assert is_full(redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert is_full(redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."))
    assert not is_full(redis.ResponseError("WRONGTYPE Operation against a key"))
    assert not is_full(redis.ConnectionError("Connection refused"))


def test_a_jobs_footprint_counts_its_items_and_batches_and_little_by_reference() -> None:
    spec = JobSpec("fanout.double_batch")
    listed = Plan("a", spec, list(range(1000)))
    by_range = Plan("b", spec, range(1000))
    by_reference = Plan("c", replace(spec, where="/r/c"), list(range(1000)))
    size = len(json.dumps(list(range(1000)), separators=(",", ":")))
    assert footprint(listed, 10) == size * 4 // 3 + size // 3 + 10 * 2600
    assert footprint(by_range, 10) == footprint(listed, 10)
    assert footprint(by_reference, 10) == 10 * 2600


def test_workers_use_fanouts_transport_for_redis_and_sentinel_urls_under_kombus_names() -> None:
    from kombu.transport import resolve_transport

    from workers import broker
    from workers.app import app

    assert resolve_transport("redis") is broker.Transport
    assert resolve_transport("rediss") is broker.Transport
    assert resolve_transport("sentinel") is broker.SentinelTransport
    # The connection keeps its scheme: Flower's Broker page builds on it.
    with app.connection_for_read() as connection:
        assert connection.as_uri().split("://")[0] in ("redis", "rediss", "sentinel")
        assert isinstance(connection.transport, (broker.Transport, broker.SentinelTransport))


def test_kombus_redis_qos_still_has_the_methods_fanouts_transport_overrides() -> None:
    import inspect

    from kombu.transport import redis as kombu_redis

    from workers import broker

    # kombu 5.7 (pinned): the overrides call these with the same arguments.
    assert list(inspect.signature(kombu_redis.QoS.append).parameters) == ["self", "message", "delivery_tag"]
    restore = inspect.signature(kombu_redis.QoS.restore_by_tag).parameters
    assert list(restore) == ["self", "tag", "client", "leftmost"]
    assert broker.Transport.Channel.QoS is broker.QoS and broker.SentinelTransport.Channel.QoS is broker.QoS
    assert issubclass(broker.Channel, kombu_redis.Channel)
    assert redis.OutOfMemoryError in broker.Transport.connection_errors
