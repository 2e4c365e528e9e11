"""Helpers for the fault tests: rigged jobs, workers on their own queue, a Redis of their own.

The tests build and send jobs only through :func:`rigged_job`, :func:`double_job`,
:func:`resize_job` and :func:`send`: they are the one place that knows the client's
build-and-send API.  The fixtures that go with these (``start_worker``, ``own_redis``,
``marks``) are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, chord, group
from celery.canvas import Signature

from orchestrator import builtin
from orchestrator.canvas import build
from orchestrator.follow import wait
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
        # Closed, it is subscribed to nothing: a result apply_async returned, collected later (at
        # exit, say), would otherwise unsubscribe from a Redis gone by then (an error pytest reports).
        consumer.subscribed_to.clear()
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
    fold: bool = False,
) -> Built:
    """A chord of ``fanout.test.rigged_batch`` headers (or ``task``'s, with ``kwargs``) and the real
    ``fanout.collect``, on ``queue`` (the callback on ``callback_queue`` if given).

    ``limits`` are the headers' (hard, soft) time limits; None keeps the settings' defaults.
    With ``results_root``, the job is sent by reference (its parts are files there).
    With ``fold``, ``task`` folds (``fanout.test.rigged_fold``): the callback merges its partials.
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
    if fold:
        job["fold"] = task
    body = app.signature("fanout.collect", kwargs={"job": job}).set(
        task_id=job_id, queue=callback_queue or queue
    )
    # Its items are kept in Redis (as a job sent by value keeps them), so the healer can
    # send a batch Redis dropped again, even when its parts go to ``results_root``.
    plan = Plan(job_id, JobSpec(task, shown_as="double", kwargs=kwargs, fold=task if fold else None), values)
    return Built(plan, batch_size, chord(group(header), body))


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
    """SIGKILL the worker's main process, then its whole process group (its pool), as losing
    the machine would: the pool children would otherwise finish their batch on their own."""
    if local.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(local.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(local.process.pid, signal.SIGKILL)
        local.process.wait(10)


def log_of(local: LocalWorker) -> str:
    """What ``local`` has logged so far."""
    assert local.log_path is not None
    return Path(local.log_path).read_text(errors="replace")


def busy(app: Celery, local: LocalWorker, timeout: float = 30) -> set[str]:
    """The ids of the tasks ``local`` is running, once it runs at least one."""
    found: set[str] = set()

    def running() -> bool:
        replies = app.control.inspect([local.hostname], timeout=1).active() or {}
        found.update(task["id"] for task in replies.get(local.hostname, []))
        return bool(found)

    wait_until(running, timeout, f"{local.hostname} to be busy", interval=0.02)
    return found


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


# --- sending jobs: the one place that calls the client's build-and-send API ----------------------


@dataclass(frozen=True)
class Built:
    """A job built and not yet sent: its plan, its batch size, and the chord to send (None:
    the one fanout builds from the plan)."""

    plan: Plan
    batch_size: int
    signature: Signature | None = None

    @property
    def job_id(self) -> str:
        return self.plan.job_id

    @property
    def batches(self) -> int:
        return self.plan.batches(self.batch_size)


@dataclass(frozen=True)
class Sent:
    """A job sent to the workers: what a test waits on."""

    app: Celery
    #: The job as ``fanout.submit`` returns it (``as_completed``, ``progress``, ...).
    job: Job

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def group_id(self) -> str:
        return self.job.group_id

    def wait(self, timeout: float, progress: Callable[[int, int], None] | None = None) -> Any:
        """The outcome (fanout's outcome document), once the fan-in is done."""
        return wait(self.app, self.job, timeout, progress=progress)

    def waiting(self, timeout: float) -> Waiting:
        """:meth:`wait` in a thread, as a client is waiting when a fault strikes."""
        return Waiting(self, timeout)


def send(app: Celery, built: Built, max_failures: int | None = None) -> Sent:
    """Send a built job (its record and inputs kept as ``fanout`` keeps them), with no checks first."""
    return Sent(app, publish(app, built.plan, built.batch_size, max_failures, signature=built.signature))


def double_job(values: Sequence[int], batch_size: int) -> Built:
    """The built-in doubling job over ``values``, built and not yet sent."""
    return Built(builtin.double(values), batch_size)


def resize_job(
    pairs: Sequence[tuple[str, str]],
    max_side: int,
    out_dir: Path,
    batch_size: int,
    queue: str | None = None,
    limits: tuple[int, int] | None = None,
) -> Built:
    """The built-in resize job over (source, destination) ``pairs``, built and not yet sent: its
    header and callback on ``queue`` if given, its header with (hard, soft) ``limits`` if given."""
    plan = builtin.resize(pairs, max_side, str(out_dir))
    signature = build(plan, batch_size)
    for header in signature.tasks:
        header.set(**({"queue": queue} if queue else {}))
        if limits:
            header.set(time_limit=limits[0], soft_time_limit=limits[1])
    if queue:
        signature.body.set(queue=queue)
    return Built(plan, batch_size, signature)


class Waiting:
    """``Sent.wait`` running in a thread: the times progress moved, then how it ended."""

    def __init__(self, sent: Sent, timeout: float) -> None:
        self.moved: list[float] = []
        self.outcome: Any = None
        self.error: Exception | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(sent, timeout), daemon=True)
        self.thread.start()

    def _run(self, sent: Sent, timeout: float) -> None:
        try:
            self.outcome = sent.wait(
                timeout, progress=lambda _done, _all: self.moved.append(time.monotonic())
            )
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        self.ended_at = time.monotonic()

    def ended(self, timeout: float) -> float:
        """When the wait ended; AssertionError if it has not within ``timeout`` seconds."""
        self.thread.join(timeout)
        assert self.ended_at is not None, f"the wait did not end within {timeout} s"
        return self.ended_at


def cli_waiting(url: str, job_id: str, timeout: float = 120) -> subprocess.Popen[str]:
    """``fanout status JOB_ID --wait --json`` in the background, against the Redis at ``url``."""
    from tests.conftest import fanout_command

    return subprocess.Popen(
        fanout_command("status", job_id, "--wait", "--json", "--timeout", str(timeout)),
        env={**os.environ, "FANOUT_REDIS_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def polling(server: RedisServer) -> Callable[[], bool]:
    """Whether a client of ``server`` is in its wait loop: only the wait sends ZCARD (a test
    reads its progress with :func:`counted`)."""
    import redis

    def seen() -> bool:
        client = redis.Redis(host=server.bind, port=server.port)
        try:
            return any(c.get("cmd") == "zcard" for c in client.client_list())
        finally:
            client.close()

    return seen


def quick_env(url: str) -> dict[str, str]:
    """Worker settings for fault tests on the Redis at ``url``: QUICK, there."""
    return {**QUICK, "FANOUT_REDIS_URL": url}


def deliver_first_batch_twice(app: Celery, queue: str) -> None:
    """Copy the first batch's message on ``queue``, before any worker takes it, as a redelivery
    after the batch already finished would (same task id, same chord)."""
    client = app.backend.client
    first = client.lrange(queue, -1, -1)[0]
    assert json.loads(first)["headers"]["group_index"] == 0
    client.rpush(queue, first)


def runs_of(marks: Path) -> dict[str, int]:
    """How many times each item of a rigged job ran, by the item's name (its value as marked).

    The mark a [KILL_ONCE, ...] item leaves once, before it kills its process, is not a run.
    """
    counts: dict[str, int] = {}
    for mark in marks.iterdir():
        if mark.name.count(".") >= 2:
            name = mark.name.rsplit(".", 2)[0]
            counts[name] = counts.get(name, 0) + 1
    return counts
