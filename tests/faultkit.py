"""Helpers for the fault tests: rigged jobs, workers on their own queue, a Redis of their own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, chord, group
from celery.canvas import Signature

from orchestrator.jobs import Job
from orchestrator.local import LocalWorker
from orchestrator.plan import JobSpec, Plan
from orchestrator.send import publish
from workers.app import celery_config
from workers.batches import batch_task_id
from workers.settings import Settings

#: Worker settings that make the fault tests quick: a lost message is back within seconds.
QUICK = {"FANOUT_TASK_TIME_LIMIT": "4", "FANOUT_VISIBILITY_TIMEOUT": "10", "FANOUT_RESTORE_INTERVAL": "1"}
#: The (hard, soft) time limits that go with QUICK.  Celery puts the sender's limits
#: into each message, so a test's messages must carry the limits its workers assume.
QUICK_LIMITS = (4, 3)


def new_queue() -> str:
    """A queue no other worker on the database consumes (the session's worker takes `celery`)."""
    return f"faults-{uuid.uuid4().hex[:8]}"


#: The apps :func:`app_for` made and no one has closed yet (tests/conftest.py closes them
#: after each test).
_open_apps: list[Celery] = []


def app_for(url: str) -> Celery:
    """A Celery app like fanout's, pointed at ``url`` (the process's own app keeps its settings).

    Closed, its Redis connections with it, when the test that made it ends.
    """
    app = Celery(f"fanout-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env({"FANOUT_REDIS_URL": url})))
    _open_apps.append(app)
    return app


def close_app(app: Celery) -> None:
    """Close ``app``'s Redis connections now: its result subscriptions', its result backend's
    pool's, and its broker connection pool's.

    ``app.close()`` alone (Celery 5.7) only drops the broker pool: the connections that
    published through ``apply_async`` (fanout's fallback path, and any chord the bulk path
    does not cover) keep their channels' Redis sockets open until the garbage collector
    finalizes them, an unclosed-socket ResourceWarning in whichever later test it runs in.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
    app.backend.client.connection_pool.disconnect()
    # kombu keeps one connection pool and one producer pool per broker URL, for every app in the
    # process: taken out of its registry, the next app on that URL gets new ones.  Not the pools
    # fanout's own app (the session's) uses: they live as long as it does.
    from kombu import pools
    from kombu.utils.collections import eqhash

    from workers.app import app as fanout_app

    with app.connection_for_write() as connection, fanout_app.connection_for_write() as own:
        key = eqhash(connection)  # type: ignore[no-untyped-call]
        if key != eqhash(own):  # type: ignore[no-untyped-call]
            for registry in (pools.producers, pools.connections):
                pool = dict.pop(registry, key, None)
                if pool is not None:
                    pool.force_close_all()  # each connection's channels, and their Redis pools, closed
    app.close()


def close_apps() -> None:
    """Close every app :func:`app_for` made that is still open."""
    while _open_apps:
        close_app(_open_apps.pop())


def rigged_job(
    app: Celery,
    values: Sequence[Any],
    batch_size: int,
    queue: str,
    seconds: float = 0.0,
    marks: Path | None = None,
    limits: tuple[int, int] | None = QUICK_LIMITS,
    results_root: Path | None = None,
    task: str = "fanout.test.rigged_batch",
    kwargs: dict[str, Any] | None = None,
    callback_queue: str | None = None,
) -> Rigged:
    """A chord of ``fanout.test.rigged_batch`` headers (or ``task``'s, with ``kwargs``) and the real
    ``fanout.collect``, on ``queue`` (the callback on ``callback_queue`` if given).

    ``limits`` are the headers' (hard, soft) time limits; None keeps the settings' defaults.
    With ``results_root``, the job is sent by reference (its parts are files there).
    """
    job_id = str(uuid.uuid4())
    values = list(values)
    kwargs = {"seconds": seconds, "marks": str(marks or "")} if kwargs is None else kwargs
    time_limits = {"time_limit": limits[0], "soft_time_limit": limits[1]} if limits else {}
    where = str(results_root / job_id) if results_root else None
    by_ref = (where,) if where else ()
    header = [
        app.signature(task, args=(start, values[start : start + batch_size], kwargs, *by_ref)).set(
            immutable=True,
            ignore_result=True,
            queue=queue,
            task_id=batch_task_id(job_id, index),
            **time_limits,
        )
        for index, start in enumerate(range(0, len(values), batch_size))
    ]
    job: dict[str, Any] = {"job_id": job_id, "task": "double", "total": len(values)}
    if where:
        job.update(where=where, root=str(results_root))
    body = app.signature("fanout.collect", kwargs={"job": job}).set(
        task_id=job_id, queue=callback_queue or queue
    )
    # Its items are kept in Redis (as a job sent by value keeps them), so the healer can
    # send a batch Redis dropped again, even when its parts go to ``results_root``.
    plan = Plan(job_id, JobSpec(task, shown_as="double", kwargs=kwargs), values)
    return Rigged(plan, batch_size, chord(group(header), body))


@dataclass(frozen=True)
class Rigged:
    """A job of rigged headers, built by hand and not yet sent: :meth:`send` sends it as fanout does."""

    plan: Plan
    batch_size: int
    signature: Signature

    @property
    def job_id(self) -> str:
        return self.plan.job_id

    @property
    def batches(self) -> int:
        return self.plan.batches(self.batch_size)

    def send(self, app: Celery, max_failures: int | None = None) -> Job:
        return publish(app, self.plan, self.batch_size, max_failures, signature=self.signature)


def worker(
    app: Celery, queue: str, tmp: Path, name: str, env: Mapping[str, str] | None = None, concurrency: int = 2
) -> LocalWorker:
    """A started worker that also knows the rigged tasks and consumes only ``queue``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    local = LocalWorker(
        app,
        concurrency=concurrency,
        name=f"{name}-{uuid.uuid4().hex[:6]}",
        env=full_env,
        log_path=str(tmp / f"{name}.log"),
        extra_args=["--include", "tests.faulty", "--queues", queue],
    )
    return local.start(timeout=60)


def kill_all(local: LocalWorker) -> None:
    """SIGKILL the worker's whole process group: its main process and its pool."""
    if local.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(local.process.pid, signal.SIGKILL)
        local.process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of a test's own, on a free port and a data directory of its own."""

    def __init__(self, directory: Path, persistent: bool, bind: str = "127.0.0.1", port: int | None = None):
        self.directory = directory
        self.persistent = persistent
        self.bind = bind
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []  # e.g. ["ip", "netns", "exec", NAME]

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"
        ]  # fmt: skip
        self.process = subprocess.Popen(
            [*self.prefix, binary, "--bind", self.bind, "--port", str(self.port), "--save", "",
             *persistence, "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._answers():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server on {self.bind}:{self.port} did not answer")

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=self.bind, port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): with AOF on, everything acknowledged is on disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_every_index_once(outcome: Any, values: Sequence[int], by_reference: bool = False) -> None:
    """The outcome of a rigged job over ``values``: every value doubled, in order, none failed.

    A job sent by reference (``by_reference``: it must have been) is read from its results location.
    """
    from workers import results

    if by_reference:
        assert "ref" in outcome, "the job should have gone by reference"
    whole = results.materialize(outcome) if "ref" in outcome else outcome
    assert whole["total"] == len(values)
    assert whole["results"] == [2 * v for v in values]
    assert (whole["succeeded"], whole["failed"], whole["errors"]) == (len(values), 0, [])


def counted(app: Celery, group_id: str) -> int:
    """How many batches of ``group_id`` the chord has counted, read without a ZCARD (the done
    bitmap): a test can then tell a waiting client, the only one to send ZCARD, by its command."""
    from workers import keys

    return int(app.backend.client.bitcount(keys.done(group_id)))
