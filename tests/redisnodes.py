"""Redis servers of a test's own beyond a plain one: TLS-only with a CA of its own, and Sentinel groups.

Every process is a real ``redis-server`` on a free loopback port, started in a
session of its own and killed by PID at the end (:func:`kill`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from orchestrator.local import LocalWorker
from tests.faultkit import free_port
from workers.app import celery_config
from workers.settings import Settings


def redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    return binary


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Certificates:
    """A CA of the test's own, a server certificate it signed for 127.0.0.1, and an unrelated CA."""

    ca: Path
    cert: Path
    key: Path
    wrong_ca: Path

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        directory.mkdir(parents=True, exist_ok=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for name in ("ca", "wrong-ca"):
            _openssl(
                "req", "-x509", *ec, "-keyout", directory / f"{name}.key", "-out", directory / f"{name}.pem",
                "-days", "2", "-subj", f"/CN=fanout test {name}",
            )  # fmt: skip
        _openssl(
            "req", *ec, "-keyout", directory / "server.key", "-out", directory / "server.csr",
            "-subj", "/CN=127.0.0.1",
        )  # fmt: skip
        extensions = directory / "server.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(
            "x509", "-req", "-in", directory / "server.csr", "-CA", directory / "ca.pem",
            "-CAkey", directory / "ca.key", "-CAcreateserial", "-out", directory / "server.pem",
            "-days", "2", "-extfile", extensions,
        )  # fmt: skip
        return cls(
            directory / "ca.pem",
            directory / "server.pem",
            directory / "server.key",
            directory / "wrong-ca.pem",
        )

    def server_args(self) -> list[str]:
        """redis-server options for TLS only: no plain port, and TLS between replicas too."""
        return [
            "--port", "0", "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no", "--tls-replication", "yes",
        ]  # fmt: skip


def _tls_ping(port: int, ca: Path) -> bool:
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        ssl=True,
        ssl_ca_certs=str(ca),
        socket_connect_timeout=0.5,
        socket_timeout=1,
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _plain_ping(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class Node:
    """One ``redis-server`` process (a Redis or a Sentinel) on 127.0.0.1:``port``."""

    name: str
    port: int
    args: list[str]
    directory: Path
    tls: Certificates | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Node:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_server(), *self.args],
            cwd=self.directory,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            if self.answers():
                return self
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} on port {self.port} did not answer within {timeout:g} s; see {self.log}"
        )

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def answers(self) -> bool:
        return _tls_ping(self.port, self.tls.ca) if self.tls else _plain_ping(self.port)

    def client(self, **kwargs: Any) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **tls, **kwargs)

    def kill(self) -> None:
        """``kill -9`` by PID, as a crash or a lost host."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def tls_redis(directory: Path, certificates: Certificates) -> Node:
    """A TLS-only ``redis-server`` (no plain port), verified against ``certificates.ca``."""
    port = free_port()
    args = [
        "--bind", "127.0.0.1", "--tls-port", str(port), *certificates.server_args(), "--save", "",
        "--appendonly", "no", "--dir", str(directory), "--logfile", "redis.log",
    ]  # fmt: skip
    node = Node("redis", port, args, directory, tls=certificates)
    node.directory = directory
    return node.start()


#: Sentinel timings that make a failover take seconds: the master is judged down after 1 s.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


@dataclass
class SentinelGroup:
    """A master, a replica and three Sentinels watching them as ``master_name``, all on loopback."""

    directory: Path
    master_name: str = "mymaster"
    redis: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        master_port, replica_port = free_port(), free_port()
        for name, port, extra in (
            ("master", master_port, []),
            ("replica", replica_port, ["--replicaof", "127.0.0.1", str(master_port)]),
        ):
            args = [
                "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--logfile", f"{name}.log", "--protected-mode", "no", *extra,
            ]  # fmt: skip
            self.redis.append(Node(name, port, args, self.directory / name).start())
        self._wait(lambda: self._replicas(self.redis[0]) >= 1, "replication")
        for i in range(3):
            port = free_port()
            directory = self.directory / f"sentinel{i}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
                f"logfile sentinel{i}.log\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self.sentinels.append(Node(f"sentinel{i}", port, [str(config), "--sentinel"], directory).start())
        # Ready once every Sentinel knows the replica and the other two Sentinels.
        self._wait(self._settled, "the Sentinels to find the replica and each other")
        return self

    @staticmethod
    def _replicas(node: Node) -> int:
        info: Any = node.client().info("replication")
        return int(info["connected_slaves"])

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            state: Any = sentinel.client(decode_responses=True).sentinel_master(self.master_name)
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                return False
        return True

    def _wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if check():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def env(self) -> dict[str, str]:
        return {"FANOUT_REDIS_URL": self.url, "FANOUT_SENTINEL_MASTER": self.master_name}

    def master_port(self) -> int:
        """The master's port as a live Sentinel names it."""
        for sentinel in self.sentinels:
            if sentinel.alive:
                with contextlib.suppress(redis.RedisError):
                    address: Any = sentinel.client().sentinel_get_master_addr_by_name(self.master_name)
                    return int(address[1])
        raise RuntimeError("no Sentinel answers")

    def _named_port(self, sentinel: Node) -> int:
        address: Any = sentinel.client().sentinel_get_master_addr_by_name(self.master_name)
        return int(address[1])

    def node_on(self, port: int) -> Node:
        return next(n for n in self.redis if n.port == port)

    def wait_for_new_master(self, old: int, timeout: float = 30.0) -> float:
        """Seconds until every live Sentinel names a master not on port ``old``, and it answers as master."""
        began = time.monotonic()

        def promoted() -> bool:
            ports = {self._named_port(s) for s in self.sentinels if s.alive}
            if len(ports) != 1 or old in ports:
                return False
            info: Any = self.node_on(ports.pop()).client(decode_responses=True).info("replication")
            role = info["role"]
            return bool(role == "master")

        self._wait(promoted, "a failover", timeout)
        return time.monotonic() - began

    def stop(self) -> None:
        for node in [*self.sentinels, *self.redis]:
            node.kill()


@contextlib.contextmanager
def sentinel_group(directory: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(directory)
    try:
        yield group.start()
    finally:
        group.stop()


def app_for_env(env: Mapping[str, str]) -> Celery:
    """A Celery app like fanout's, configured from ``env`` alone (this process's app keeps its settings)."""
    app = Celery(f"fanout-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env(env)))
    return app


def fanout_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its Redis settings, plus ``extra``: for a worker or a client."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FANOUT_REDIS", "FANOUT_BROKER", "FANOUT_RESULT"))
    }
    env.update(extra)
    return env


def start_worker(env: Mapping[str, str], log: Path, name: str, concurrency: int = 2) -> LocalWorker:
    """A real ``celery -A workers worker`` configured by ``env``, that also imports tests.userjobs."""
    env = {**env, "FANOUT_IMPORTS": "tests.userjobs"}
    local = LocalWorker(
        app_for_env(env),
        concurrency=concurrency,
        name=f"{name}-{uuid.uuid4().hex[:6]}",
        env=env,
        log_path=str(log),
    )
    return local.start(timeout=60)


#: A client process that runs ``fanout.map(tests.userjobs.triple, range(N))`` and prints the outcome as JSON.
MAP_SCRIPT = """
import json, sys
import fanout
from tests.userjobs import triple
outcome = fanout.map(triple, range(int(sys.argv[1])), batch_size=int(sys.argv[2]), timeout=float(sys.argv[3]))
print(json.dumps({"results": outcome.results, "errors": len(outcome.errors)}))
"""


def map_command(items: int, batch_size: int, timeout: float) -> list[str]:
    return [sys.executable, "-c", MAP_SCRIPT, str(items), str(batch_size), str(timeout)]
