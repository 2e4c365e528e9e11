"""Local ``celery worker`` processes, started and stopped by the orchestrator (demo, tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from celery import Celery

from workers.errors import InfrastructureError


class LocalWorker:
    """One ``celery -A workers worker`` process in the background.

    ``start()`` returns once the worker has registered itself in Redis; ``stop()`` asks for a
    warm shutdown and kills it if it does not leave in time.

    The worker runs in a session of its own (a Ctrl-C meant for the orchestrator
    does not reach it mid-task), so it would outlive an orchestrator that is
    killed outright (``kill -9``, a test's subprocess timeout).  On Linux it is
    therefore tied to the thread that started it: when that thread's process
    dies, the kernel sends the worker SIGTERM, a warm shutdown.
    """

    def __init__(
        self,
        app: Celery,
        concurrency: int = 2,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.app = app
        self.concurrency = concurrency
        self.node = f"{name or 'local-' + uuid.uuid4().hex[:8]}@%h"
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.hostname = ""

    @property
    def command(self) -> list[str]:
        return worker_command(self.concurrency, ["--hostname", self.node, *self.extra_args])

    def start(self, timeout: float = 60.0) -> LocalWorker:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_ended_with(os.getpid()),
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self.hostname = self.node.replace("%h", _hostname())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise InfrastructureError(
                    f"worker {self.hostname} exited with code {self.process.returncode} while starting"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if self.registered():
                return self
            time.sleep(0.1)
        self.stop()
        raise InfrastructureError(f"worker {self.hostname} did not register in Redis within {timeout:g} s")

    def registered(self) -> bool:
        """Whether this worker has registered itself in Redis: it consumes, and clients can find it."""
        from orchestrator.discovery import list_workers

        return any(w.name == self.hostname for w in list_workers(self.app))

    def stop(self, timeout: float = 20.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def __enter__(self) -> LocalWorker:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.stop()


def worker_command(concurrency: int, extra_args: list[str]) -> list[str]:
    """``celery -A workers worker`` as fanout runs it: INFO logs, no gossip or mingle (workers
    need not know each other: the broker hands out the work), ``concurrency`` pool processes."""
    return [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--loglevel", "INFO", "--concurrency", str(concurrency),
        "--without-gossip", "--without-mingle",
        *extra_args,
    ]  # fmt: skip


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period) + 0.5)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


#: prctl(2) option: the signal the calling process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def _ended_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent`` dies (Linux only).

    The setting survives the ``exec`` of the worker and is not inherited by its
    pool processes, which the worker's own warm shutdown ends.
    """
    if not sys.platform.startswith("linux"):
        return None

    def tie() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the tie was made
            os.kill(os.getpid(), signal.SIGTERM)

    return tie


def _hostname() -> str:
    import socket

    return socket.gethostname()
