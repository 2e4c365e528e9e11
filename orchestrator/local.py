"""Local ``celery worker`` processes, started and stopped by the orchestrator (demo, tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from types import TracebackType

from celery import Celery

from workers.errors import InfrastructureError


class LocalWorker:
    """One ``celery -A workers worker`` process in the background.

    ``start()`` returns once the worker answers a ping; ``stop()`` asks for a
    warm shutdown and kills it if it does not leave in time.
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
        return [
            sys.executable, "-m", "celery", "-A", "workers", "worker",
            "--loglevel", "INFO", "--concurrency", str(self.concurrency),
            "--hostname", self.node, "--without-gossip", "--without-mingle",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> LocalWorker:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
            if self.app.control.ping([self.hostname], timeout=0.5):
                return self
        self.stop()
        raise InfrastructureError(f"worker {self.hostname} did not answer a ping within {timeout:g} s")

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


def _hostname() -> str:
    import socket

    return socket.gethostname()
