"""A network partition across hosts: Redis and two workers, each in a network namespace of its own.

The namespaces, joined by veth pairs with their own addresses, are separate
hosts as far as TCP is concerned, so this is also the test that fanout works
across machines.  Needs root (``ip netns``); skipped otherwise, except under CI,
which runs as root.  Everything it creates is named ``fo4-...`` and removed
afterwards.  The test process itself reaches Redis through its Unix socket, so
nothing is added to the machine's own network.  (Redis's protected mode is off:
its only network is the private one between these namespaces.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from orchestrator.follow import callback_meta
from orchestrator.local import LocalWorker
from tests.faultkit import (
    QUICK,
    app_for,
    assert_every_index_once,
    busy,
    free_port,
    kill_all,
    new_queue,
    rigged_job,
    send,
    wait_until,
)

pytestmark = [pytest.mark.system, pytest.mark.netns]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class NamespacedWorker(LocalWorker):
    """A worker process started inside network namespace ``netns``."""

    def __init__(self, netns: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.netns = netns

    @property
    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command]


@dataclass
class Hosts:
    tag: str
    subnet: str  # first three octets
    redis_ns: str = ""
    worker_ns: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # worker host -> its end of the veth
    redis_addr: dict[str, str] = field(default_factory=dict)  # worker host -> Redis address it uses
    socket: Path = Path()
    redis: subprocess.Popen[bytes] | None = None


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("the partition test needs root, iproute2 and redis-server; CI has all three")
        pytest.skip("needs root, iproute2 and redis-server")
    tag = uuid.uuid4().hex[:5]
    net = Hosts(tag=tag, subnet=f"10.254.{int(tag[:2], 16)}")
    net.redis_ns = f"fo4-{tag}-redis"
    made: list[str] = []
    try:
        for name in (net.redis_ns, *(f"fo4-{tag}-{h}" for h in "ab")):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for k, host in enumerate("ab"):
            ns, link = f"fo4-{tag}-{host}", f"fo4{tag}{host}"
            redis_side, worker_side = f"{net.subnet}.{4 * k + 1}", f"{net.subnet}.{4 * k + 2}"
            ip(
                "link",
                "add",
                link,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"{link}r",
                "netns",
                net.redis_ns,
            )
            ip("-n", ns, "addr", "add", f"{worker_side}/30", "dev", link)
            ip("-n", net.redis_ns, "addr", "add", f"{redis_side}/30", "dev", f"{link}r")
            ip("-n", ns, "link", "set", link, "up")
            ip("-n", net.redis_ns, "link", "set", f"{link}r", "up")
            net.worker_ns[host], net.links[host], net.redis_addr[host] = ns, link, redis_side
        port = free_port()
        net.socket = tmp_path / "redis.sock"
        net.redis = subprocess.Popen(
            ["ip", "netns", "exec", net.redis_ns, "redis-server", "--port", str(port),
             "--bind", *net.redis_addr.values(), "--unixsocket", str(net.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--protected-mode", "no",
             "--logfile", str(tmp_path / "redis.log")],
            start_new_session=True,
        )  # fmt: skip
        net.redis_addr = {h: f"redis://{a}:{port}/0" for h, a in net.redis_addr.items()}
        wait_until(net.socket.exists, 20, "the namespaced Redis's socket")
        yield net
    finally:
        if net.redis is not None:
            net.redis.send_signal(signal.SIGTERM)
            net.redis.wait(20)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


@pytest.mark.timeout(240)
def test_a_partitioned_worker_host_loses_nothing_and_counts_nothing_twice(
    hosts: Hosts, tmp_path: Path
) -> None:
    app: Celery = app_for(f"redis+socket://{hosts.socket}")
    queue = new_queue()
    workers: dict[str, LocalWorker] = {}
    try:
        for host in "ab":
            env = {**os.environ, **QUICK, "FANOUT_REDIS_URL": hosts.redis_addr[host]}
            local = NamespacedWorker(
                hosts.worker_ns[host],
                app,
                concurrency=2,
                name=f"host-{host}-{hosts.tag}",
                env=env,
                log_path=str(tmp_path / f"{host}.log"),
                extra_args=["--include", "tests.faulty", "--queues", queue],
            )
            workers[host] = local.start(timeout=60)
        values = list(range(16))
        job = rigged_job(app, values, 1, queue, seconds=2)
        sent = send(app, job)
        cut_off = busy(app, workers["a"])
        ip("-n", hosts.worker_ns["a"], "link", "set", hosts.links["a"], "down")  # the cable is cut
        a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"

        def reported(task_id: str) -> bool:
            """Host a's run of the task ended: its report to the chord got Redis's answer."""
            return f"Task fanout.test.rigged_batch[{task_id}] succeeded" in a_log.read_text()

        # Host b takes over host a's batches once the visibility timeout passes.
        redone = lambda: all(f"rigged_batch[{t}] received" in b_log.read_text() for t in cut_off)  # noqa: E731
        wait_until(redone, 60, "host b to redo host a's batches")
        # Host a's running batches finished their work meanwhile, but their reports to the
        # chord are stuck behind the cut (retried, see workers/backend.py).
        late = {task_id for task_id in cut_off if not reported(task_id)}
        assert late, "host a's running batches should not have reported through the cut"

        # The link heals while the run goes on: the cut lasts about the visibility timeout,
        # however loaded the machine, so TCP's retransmission back-off stays short.
        ip("-n", hosts.worker_ns["a"], "link", "set", hosts.links["a"], "up")
        outcome = sent.wait(timeout=90)
        assert_every_index_once(outcome, values)
        # Every late report reached Redis (the chord script answered it, and only then does
        # the task end): counted once, whether before or after host b's copy.
        wait_until(lambda: all(reported(task_id) for task_id in late), 60, "host a's late reports")
        wait_until(lambda: bool(app.control.ping([workers["a"].hostname], timeout=1)), 30, "host a")
        meta = callback_meta(app, job.job_id)
        assert meta is not None and meta["result"] == outcome, "the fan-in changed after the heal"
        collects = sum((tmp_path / f"{h}.log").read_text().count("Task fanout.collect[") for h in "ab")
        # One "received" and one "succeeded" line: the callback ran exactly once.
        assert collects == 2, "the callback should run exactly once"
    finally:
        for started in workers.values():
            started.stop(timeout=10)
            kill_all(started)
