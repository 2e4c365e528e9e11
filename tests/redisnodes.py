"""Redis servers of a test's own beyond a plain one: TLS-only with a CA of its own, and Sentinel groups.

Every process is a real ``redis-server`` on a free loopback port, started in a
session of its own and killed by PID at the end (:func:`kill`).
"""

from __future__ import annotations

import contextlib
import json
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

    def server_options(self) -> list[tuple[str, str]]:
        """redis-server options for TLS only: no plain port, and TLS between replicas too."""
        return [
            ("port", "0"), ("tls-cert-file", str(self.cert)), ("tls-key-file", str(self.key)),
            ("tls-ca-cert-file", str(self.ca)), ("tls-auth-clients", "no"), ("tls-replication", "yes"),
        ]  # fmt: skip

    def server_args(self) -> list[str]:
        return [arg for name, value in self.server_options() for arg in (f"--{name}", value)]


@dataclass
class Node:
    """One ``redis-server`` process (a Redis or a Sentinel) on 127.0.0.1:``port``."""

    name: str
    port: int
    args: list[str]
    directory: Path
    tls: Certificates | None = None
    password: str | None = None
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
        client = self.client(socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client of this server alone (TLS and password as it needs), for the test's own checks."""
        options: dict[str, Any] = {"socket_timeout": 5, "password": self.password}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return redis.Redis(host="127.0.0.1", port=self.port, **{**options, **kwargs})

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
    #: TLS only, on every Redis and Sentinel (replication and the Sentinels' links too).
    tls: Certificates | None = None
    #: Redis's password (requirepass and masterauth), and the Sentinels' own.
    password: str | None = None
    sentinel_password: str | None = None
    redis: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        master_port, replica_port = free_port(), free_port()
        for name, port, extra in (
            ("master", master_port, []),
            ("replica", replica_port, ["--replicaof", "127.0.0.1", str(master_port)]),
        ):
            listen = ["--tls-port", str(port), *self.tls.server_args()] if self.tls else ["--port", str(port)]
            auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
            args = [
                "--bind", "127.0.0.1", *listen, *auth, "--save", "", "--appendonly", "no",
                "--logfile", f"{name}.log", "--protected-mode", "no", "--repl-diskless-sync-delay", "0",
                *extra,
            ]  # fmt: skip
            node = Node(name, port, args, self.directory / name, tls=self.tls, password=self.password)
            self.redis.append(node.start())
        # Synced, not merely connected: until its first full sync a replica holds nothing to promote.
        self._wait(lambda: self._link_up(self.redis[1]), "the replica's first sync")
        for i in range(3):
            port = free_port()
            directory = self.directory / f"sentinel{i}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "sentinel.conf"
            lines = [
                f"bind 127.0.0.1\nprotected-mode no\ndir {directory}\nlogfile sentinel{i}.log",
                f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {self.master_name} 1",
            ]
            if self.tls:
                lines += [
                    f"tls-port {port}",
                    *(f"{name} {value}" for name, value in self.tls.server_options()),
                ]
            else:
                lines.append(f"port {port}")
            if self.password:
                lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
            if self.sentinel_password:
                lines.append(
                    f"requirepass {self.sentinel_password}\nsentinel sentinel-pass {self.sentinel_password}"
                )
            config.write_text("\n".join(lines) + "\n")
            sentinel = Node(
                f"sentinel{i}", port, [str(config), "--sentinel"], directory, self.tls, self.sentinel_password
            )
            self.sentinels.append(sentinel.start())
        # Ready once every Sentinel knows the replica and the other two Sentinels.
        self._wait(self._settled, "the Sentinels to find the replica and each other")
        return self

    @staticmethod
    def _link_up(replica: Node) -> bool:
        info: Any = replica.client(decode_responses=True).info("replication")
        return bool(info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0)

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
        """The Sentinels' URL, Redis's password on the first one only (fanout puts it on each)."""
        auth = f":{self.password}@" if self.password else ""
        return (
            f"sentinel://{auth}" + ";sentinel://".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + "/0"
        )

    def env(self) -> dict[str, str]:
        env = {"FANOUT_REDIS_URL": self.url, "FANOUT_SENTINEL_MASTER": self.master_name}
        if self.sentinel_password:
            env["FANOUT_SENTINEL_PASSWORD"] = self.sentinel_password
        if self.tls:
            env.update(FANOUT_SENTINEL_TLS="1", FANOUT_SENTINEL_TLS_CA_CERTS=str(self.tls.ca))
        return env

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
def sentinel_group(directory: Path, **options: Any) -> Iterator[SentinelGroup]:
    group = SentinelGroup(directory, **options)
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
    env = {**env, "FANOUT_IMPORTS": "tests.userjobs,tests.hajobs"}
    local = LocalWorker(
        app_for_env(env),
        concurrency=concurrency,
        name=f"{name}-{uuid.uuid4().hex[:6]}",
        env=env,
        log_path=str(log),
    )
    return local.start(timeout=60)


#: A client process: ``fanout.map`` of a task over ``range(N)``, printing the outcome as JSON.
MAP_SCRIPT = """
import importlib, json, sys
import fanout
module, name = sys.argv[1].split(":")
task = getattr(importlib.import_module(module), name)
kwargs = json.loads(sys.argv[5])
outcome = fanout.map(task, range(int(sys.argv[2])), kwargs=kwargs or None, batch_size=int(sys.argv[3]),
                     timeout=float(sys.argv[4]))
print(json.dumps({"results": outcome.results, "errors": len(outcome.errors)}))
"""


def map_command(
    items: int,
    batch_size: int,
    timeout: float,
    task: str = "tests.userjobs:triple",
    kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """A ``python -c`` command that runs ``fanout.map(task, range(items))`` and prints its outcome."""
    arguments = [task, str(items), str(batch_size), str(timeout), json.dumps(kwargs or {})]
    return [sys.executable, "-c", MAP_SCRIPT, *arguments]
