"""The HA variant (docker-compose.yml + docker-compose.ha.yml) under a real Docker engine.

Brings up a Redis master, its replica, three Sentinels, two workers and Flower, every
fanout process pointed at the Sentinels. Then, while a 300-image ``fanout resize`` runs and
a 100,000-item ``fanout double`` waits behind it in the queue (alone, the double would be
over in half a second), ``docker kill``s the master, and checks step by step: the Sentinels
promote the replica within seconds, both jobs complete with every item once and the right
results, the workers and Flower carry on without a restart, and the old master, started
again, comes back as a replica of the new one.

Shares the engine, the cached images and the compose helpers with tests/test_docker_stack.py
(tests/dockerstack.py); skipped without an engine on a laptop, failed under CI. Cached, about
2 to 3 minutes; cold, the stand-ins and fanout's image are built first (about 2.5 minutes,
once per session for both docker tests).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from typing import Any

import pytest

from tests.composefile import COMPOSE, HA_COMPOSE, read_env_file
from tests.dockerstack import (
    FLOWER_PASSWORD,
    FLOWER_USER,
    IMAGES,
    Project,
    assert_every_item_once,
    build_image,
    docker,
    prepare_engine,
    project_name,
    stack_env,
    wait_for,
    write_env,
)

pytestmark = [pytest.mark.docker, pytest.mark.system, pytest.mark.timeout(900)]

SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
MASTER_NAME = "mymaster"
ITEMS = 100_000  # the double job under the failover
WORKERS = 2


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    return {}


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]) -> Iterator[Project]:
    """The HA project, built, with its Redis master, replica and Sentinels up and healthy."""
    prepare_engine(timings)
    tmp = tmp_path_factory.mktemp("ha")
    # The Sentinel timings are the file's own defaults: the failover measured is the one it ships.
    # fanout's default time limit: a chord's last report, held up by the failover, must stay
    # within its batch's soft limit (docs/failures.md), which the stack test's 10 s would not.
    env = stack_env(FANOUT_TASK_TIME_LIMIT="30", FANOUT_VISIBILITY_TIMEOUT="40")
    project = Project(project_name("ha"), [COMPOSE, HA_COMPOSE], write_env(tmp / "env", env))
    try:
        build_image(project, timings)
        started = time.monotonic()
        project("up", "-d", "redis", "redis-replica", *SENTINELS)
        project.wait_healthy(expected=5)
        timings["Redis and Sentinels up, healthy"] = time.monotonic() - started
        yield project
    finally:
        project.down()
        print("\n".join(["", f"compose project {project.name}:", *project.log]))
        print("\n".join(f"{what}: {seconds:.1f} s" for what, seconds in timings.items()))


@pytest.fixture(scope="module")
def up(ha: Project, timings: dict[str, float]) -> Project:
    """The whole HA stack up: WORKERS workers registered, Flower answering.

    Not their healthchecks: the first runs 30 s after the start (tests/test_docker_stack.py
    waits for them); a worker's registration, which comes through Redis, is what counts here.
    """
    started = time.monotonic()
    ha("up", "-d", "--scale", f"worker={WORKERS}")
    wait_for(lambda: registered(ha) == WORKERS, 120, f"{WORKERS} workers registered", interval=1)
    wait_for(lambda: flower_get(ha, "/healthcheck", raw=True) == b"OK", 60, "Flower", interval=1)
    timings["workers registered, Flower answering"] = time.monotonic() - started
    return ha


def registered(project: Project) -> int:
    """How many workers ``fanout workers`` lists (it exits 3 while there is none)."""
    proc = project.run("fanout", "workers", "--json", check=False)
    return len(json.loads(proc.stdout)) if proc.returncode == 0 else 0


def container(project: Project, service: str) -> str:
    [found] = project.containers(service)
    return found


def redis_cli(project: Project, service: str, *args: str) -> list[str]:
    """``redis-cli ARGS`` in a Redis or Sentinel container (its REDISCLI_AUTH authenticates)."""
    port = ["-p", "26379"] if service.startswith("sentinel") else []
    proc = docker("exec", container(project, service), "redis-cli", *port, *args, check=False)
    assert proc.returncode == 0, f"{service}: redis-cli {' '.join(args)}: {proc.stdout} {proc.stderr}"
    return proc.stdout.splitlines()


def sentinel(project: Project, name: str, *args: str) -> Any:
    """``SENTINEL ARGS`` asked of Sentinel ``name``, its reply as JSON (redis-cli --json)."""
    return json.loads("\n".join(redis_cli(project, name, "--json", "sentinel", *args)))


def master_as_seen_by(project: Project, name: str) -> str:
    """The master's host as Sentinel ``name`` gives it to clients."""
    host: str = sentinel(project, name, "get-master-addr-by-name", MASTER_NAME)[0]
    return host


def info(project: Project, service: str, section: str) -> dict[str, str]:
    lines = redis_cli(project, service, "info", section)
    return dict(line.strip().partition(":")[::2] for line in lines if ":" in line)


def replicas(project: Project, name: str) -> dict[str, str]:
    """Each replica Sentinel ``name`` knows, by host:port, with its flags."""
    return {r["name"]: r["flags"] for r in sentinel(project, name, "replicas", MASTER_NAME)}


def flower_get(project: Project, path: str, raw: bool = False) -> Any:
    """Flower's answer to GET ``path``, with the login: JSON, or the bytes; None if it cannot answer."""
    port = read_env_file(project.env_file)["FLOWER_PORT"]
    login = b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {login}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read() if raw else json.load(response)
    except (urllib.error.URLError, ConnectionError):
        if raw:
            return None
        raise


# --- the steps --------------------------------------------------------------------------------


def test_a_master_a_replica_and_three_sentinels_that_agree(ha: Project) -> None:
    # A Sentinel learns of the replica from the master's INFO, every 10 s.
    wait_for(lambda: all(replicas(ha, name) for name in SENTINELS), 30, "every Sentinel to know the replica")
    for name in SENTINELS:
        assert master_as_seen_by(ha, name) == "redis", name
        # Names, not container addresses: they survive a container's restart.
        assert replicas(ha, name) == {"redis-replica:6379": "slave"}, name
        others = {s["ip"] for s in sentinel(ha, name, "sentinels", MASTER_NAME)}
        assert others == set(SENTINELS) - {name}
        assert sentinel(ha, name, "ckquorum", MASTER_NAME).startswith("OK 3 usable")
    replica = info(ha, "redis-replica", "replication")
    assert (replica["role"], replica["master_host"]) == ("slave", "redis")
    assert replica["master_link_status"] == "up"
    # Failover in seconds: what the file ships.
    master = sentinel(ha, "sentinel-1", "master", MASTER_NAME)
    assert (master["down-after-milliseconds"], master["failover-timeout"]) == ("3000", "10000")
    assert master["quorum"] == "2"


def test_redis_and_the_sentinels_publish_no_port_demand_the_password_and_keep_an_aof(ha: Project) -> None:
    for service in ("redis", "redis-replica", *SENTINELS):
        info_ = ha.inspect(container(ha, service))
        assert not info_["HostConfig"]["PortBindings"], service
        # The password is demanded: without REDISCLI_AUTH, refused.
        port = ["-p", "26379"] if service.startswith("sentinel") else []
        anonymous = docker(
            "exec", "-e", "REDISCLI_AUTH=", container(ha, service), "redis-cli", *port, "ping", check=False
        )
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr, service
        # Redis runs as the redis user, as the official image's entrypoint makes it.
        assert docker("exec", container(ha, service), "stat", "-c", "%U", "/proc/1").stdout.strip() == "redis"
    for service in ("redis", "redis-replica"):
        assert redis_cli(ha, service, "config", "get", "appendonly") == ["appendonly", "yes"], service
        assert redis_cli(ha, service, "config", "get", "maxmemory-policy")[1] == "noeviction", service


def test_workers_and_flower_find_the_master_through_the_sentinels(up: Project) -> None:
    workers = up.workers()
    assert len(workers) == WORKERS, workers
    for service in ("worker", "flower"):
        found = docker("exec", up.containers(service)[0], "env").stdout.splitlines()
        env = dict(line.partition("=")[::2] for line in found)
        assert env["FANOUT_REDIS_URL"].startswith("sentinel://"), service
        assert env["FANOUT_SENTINEL_MASTER"] == MASTER_NAME, service
    doubled = json.loads(up.run("fanout", "double", "--json", *map(str, range(20))).stdout)
    assert doubled["results"] == [2 * i for i in range(20)]
    online = flower_get(up, "/api/workers?refresh=1")
    assert len(online) == WORKERS, online


def started_at(project: Project, containers: list[str]) -> dict[str, tuple[str, int]]:
    return {
        c: (project.inspect(c)["State"]["StartedAt"], project.inspect(c)["RestartCount"]) for c in containers
    }


def queued_tasks(project: Project, service: str, task: str) -> int:
    """Messages for ``task`` waiting in fanout's queue on ``service``."""
    return sum(f'"task": "{task}"' in m for m in redis_cli(project, service, "lrange", "fanout", "0", "-1"))


def test_the_master_killed_mid_run_the_replica_takes_over_and_both_jobs_complete(
    up: Project, timings: dict[str, float]
) -> None:
    up.make_inputs()
    workers = up.containers("worker")
    before = started_at(up, workers)
    nodes = {w["name"] for w in up.workers()}
    out = "/data/out-failover"
    # Given a resize running, and behind it in the queue a 100,000-item double, its client waiting
    resize = up.resize_in_background(out)
    wait_for(lambda: up.outputs(out) >= 10 or resize.poll() is not None, 120, "the resize to start")
    double = up.popen(
        "run", "--rm", "-T", "orchestrator", "fanout", "double", "--range", str(ITEMS),
        "--json", "--no-progress", "--timeout", "300",
    )  # fmt: skip
    wait_for(
        lambda: queued_tasks(up, "redis", "fanout.double_batch") or double.poll() is not None,
        60,
        "the double's batches in the queue",
    )
    assert resize.poll() is None and double.poll() is None, "a job ended before the kill"
    assert up.outputs(out) < IMAGES
    # When the master is killed
    killed = time.monotonic()
    docker("kill", container(up, "redis"))
    # Then the Sentinels promote the replica within seconds, and all name it as the master
    promoted = {name: 0.0 for name in SENTINELS}

    def all_promoted() -> bool:
        for name in [n for n, at in promoted.items() if not at]:
            if master_as_seen_by(up, name) == "redis-replica":
                promoted[name] = time.monotonic() - killed
        return all(promoted.values())

    wait_for(all_promoted, 60, "the Sentinels to promote the replica", interval=0.2)
    timings["failover: kill to the first Sentinel naming the new master"] = min(promoted.values())
    timings["failover: kill to all three naming it"] = max(promoted.values())
    assert max(promoted.values()) < 20
    assert info(up, "redis-replica", "replication")["role"] == "master"
    # And both jobs complete, every item once, with the right results
    stdout, stderr = double.communicate(timeout=400)
    # The waiting client rides the failover out (its first look for workers after it once
    # exited 3 "no worker is running": tests/test_stall_check.py).
    assert double.returncode == 0, f"exit {double.returncode}: {stderr[-2000:]}"
    doubled = json.loads(stdout)
    assert (doubled["total"], doubled["succeeded"], doubled["failed"]) == (ITEMS, ITEMS, 0)
    assert doubled["results"] == [2 * i for i in range(ITEMS)]
    resized = assert_every_item_once(resize, out, timeout=400)
    timings["kill to both jobs done"] = time.monotonic() - killed
    print(f"\nthe waiting double's stderr:\n{stderr}")
    # And the workers reconnected by themselves: the same containers, never restarted, and
    # each answers its healthcheck's ping (through the new master; the old one is still down)
    assert started_at(up, up.containers("worker")) == before
    for worker in workers:
        ping = docker("exec", worker, "sh", "-c", "celery -A workers inspect ping -d celery@$HOSTNAME")
        assert "pong" in ping.stdout, ping.stdout
    # And Flower too: it reaches the workers through the broker, saw both jobs end, and its
    # Broker page reads the queue from the new master.
    assert {*flower_get(up, "/api/workers?refresh=1")} == nodes

    def collected() -> bool:
        tasks = flower_get(up, "/api/tasks?taskname=fanout.collect&state=SUCCESS")
        return {doubled["job_id"], resized["job_id"]} <= set(tasks)

    wait_for(collected, 30, "Flower to see both jobs' collect tasks succeed")
    assert flower_get(up, "/api/queues/length")["active_queues"][0]["name"] == "fanout"
    assert not up.inspect(container(up, "redis"))["State"]["Running"]


def test_the_old_master_started_again_comes_back_as_a_replica(up: Project) -> None:
    up("start", "redis")

    def rejoined() -> bool:
        known = replicas(up, "sentinel-1")
        return (
            known.get("redis:6379") == "slave"
            and info(up, "redis", "replication").get("master_link_status") == "up"
        )

    wait_for(rejoined, 90, "the old master to rejoin as a replica", interval=1)
    replication = info(up, "redis", "replication")
    assert (replication["role"], replication["master_host"]) == ("slave", "redis-replica")
    assert info(up, "redis-replica", "replication")["connected_slaves"] == "1"
    # Sentinel rewrote its config: restarted again, it stays a replica.
    assert (
        "replicaof redis-replica 6379" in docker("exec", container(up, "redis"), "cat", "redis.conf").stdout
    )
    # And the stack takes work as before.
    doubled = json.loads(up.run("fanout", "double", "--json", *map(str, range(50))).stdout)
    assert doubled["results"] == [2 * i for i in range(50)]


def test_down_v_leaves_nothing_behind(up: Project) -> None:
    up("down", "-v", "-t", "30")
    label = f"label=com.docker.compose.project={up.name}"
    for kind in ("ps", "volume", "network"):
        listing = ("ps", "-aq") if kind == "ps" else (kind, "ls", "-q")
        assert docker(*listing, "--filter", label).stdout.split() == [], kind
