"""What the docker tests share: the engine, the cached images, a compose project, its inputs.

The stand-in base images (tests/standins/build.sh) and fanout's image are what a slow test
builds, so they are built once and kept: the stand-ins as images between runs, fanout's image
under one tag (``fanout:docker-test``, or ``FANOUT_TEST_IMAGE_TAG`` where several checkouts
share one engine), built once per session and rebuilt from its cached layers otherwise.

Without an engine, Compose or debootstrap the tests are skipped on a laptop and fail
under CI (CI=true); under CI, as root, ``.ci/ensure-docker`` is run first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.composefile import ENV_EXAMPLE, ROOT, read_env_file

DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
STANDINS = ROOT / "tests" / "standins" / "build.sh"
PYTHON_STANDIN = "fanout-standin/python:3.11-bookworm"
REDIS_STANDIN = "fanout-standin/redis:7-bookworm"
PROMETHEUS_STANDIN = "fanout-standin/prometheus:2-bookworm"
S3_SERVER = "fanout-standin/moto:5.2.5"  # moto's S3 server, built by the same script
#: Marks what the tests start outside compose (the S3 server), for the clean-up.
TEST_LABEL = "fanout-test-project"
# A fixed tag: the image is the build cache between runs (a code change rebuilds the last layers).
IMAGE_TAG = os.environ.get("FANOUT_TEST_IMAGE_TAG") or "docker-test"
IMAGES = 300  # items in the runs that lose a worker (or Redis) on the way
FLOWER_USER, FLOWER_PASSWORD = "admin", secrets.token_hex(8)
REDIS_PASSWORD = secrets.token_hex(12)
# Short enough that the work of a killed worker is redone within the test's patience.
SETTINGS = {"FANOUT_TASK_TIME_LIMIT": "10", "FANOUT_VISIBILITY_TIMEOUT": "25", "FANOUT_RESTORE_INTERVAL": "2"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc


def clean_env() -> dict[str, str]:
    """Compose lets the shell's variables win over --env-file: pass none of this process's."""
    keep = ("PATH", "HOME", "DOCKER_HOST", "LANG")
    return {k: v for k, v in os.environ.items() if k in keep}


@dataclass
class Project:
    """One compose project: ``docker-compose -p NAME --env-file ENV -f FILE...``."""

    name: str
    files: list[Path]
    env_file: Path
    log: list[str] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        compose = shutil.which("docker-compose") or "docker-compose"
        files = [a for f in self.files for a in ("-f", str(f))]
        return [compose, "--ansi", "never", "-p", self.name, "--env-file", str(self.env_file), *files, *args]

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        proc = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=ROOT
        )
        if args[0] != "ps":
            self.log.append(f"{time.monotonic() - started:6.1f} s  {' '.join(args)[:100]}")
        if check:
            assert proc.returncode == 0, f"docker-compose {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker-compose run --rm -T orchestrator ARGS``."""
        return self("run", "--rm", "-T", "orchestrator", *args, timeout=timeout, check=check)

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()

    def inspect(self, container: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(docker("inspect", container).stdout)[0]
        return result

    def health(self) -> dict[str, str]:
        states = {}
        for container in self("ps", "-q").stdout.split():
            info = self.inspect(container)
            states[info["Name"].lstrip("/")] = info["State"].get("Health", {}).get("Status", "none")
        return states

    def wait_healthy(self, expected: int, timeout: float = 150) -> dict[str, str]:
        def healthy() -> dict[str, str] | None:
            states = self.health()
            done = len(states) == expected and all(s == "healthy" for s in states.values())
            return states if done else None

        try:
            result: dict[str, str] = wait_for(healthy, timeout, f"{expected} healthy containers", 2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.health()}") from None
        return result

    def workers(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.run("fanout", "workers", "--json").stdout)
        return found

    def resize_in_background(self, out: str) -> subprocess.Popen[str]:
        return self.popen(
            "run", "--rm", "-T", "orchestrator", "fanout", "resize", "/data/in", "--out", out,
            "--max-side", "1024", "--batch-size", "1", "--no-contact-sheet", "--no-progress",
            "--json", "--timeout", "300",
        )  # fmt: skip

    def outputs(self, out: str) -> int:
        """Files in ``out`` on the data volume, seen from a running worker."""
        [container, *_] = self.containers("worker")
        proc = docker("exec", container, "sh", "-c", f"ls {out} 2>/dev/null | wc -l", check=False)
        return int(proc.stdout.strip() or 0)

    def make_inputs(self) -> str:
        """IMAGES copies of one 1920x1080 photo in /data/in on the data volume."""
        script = (
            "import shutil; from pathlib import Path; from orchestrator.samples import make_photo; "
            "d = Path('/data/in'); d.mkdir(parents=True, exist_ok=True); "
            "first = make_photo(d / 'img-000.jpg', (1920, 1080), seed=1); "
            f"[shutil.copy(first, d / f'img-{{i:03d}}.jpg') for i in range(1, {IMAGES})]"
        )
        self.run("python", "-c", script)
        return "/data/in"

    def down(self) -> None:
        if self.env_file.exists():
            # With the optional profile named, so that its services go too if a test left them up.
            self(
                "--profile", "metrics", "down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300
            )


def need(condition: bool, message: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def project_name(suffix: str = "") -> str:
    """A project name carrying this process's pid, which :func:`remove_stale_projects` reads back."""
    return f"fanouttest{os.getpid()}{secrets.token_hex(2)}{suffix}"


def remove_stale_projects() -> None:
    """Remove what an interrupted earlier run left (its containers would restart with dockerd).

    A project name carries the pid of the pytest that made it; one whose process is gone is stale.
    """
    template = '{{.Label "com.docker.compose.project"}} {{.Label "TEST_LABEL"}}'.replace(
        "TEST_LABEL", TEST_LABEL
    )
    found = docker("ps", "-a", "--format", template)
    for project in sorted(set(found.stdout.split())):
        match = re.fullmatch(r"fanouttest(\d+)[0-9a-f]{4}(?:w|ha)?", project)
        if match is None or Path(f"/proc/{match[1]}").exists():
            continue
        for label in (f"label=com.docker.compose.project={project}", f"label={TEST_LABEL}={project}"):
            containers = docker("ps", "-aq", "--filter", label).stdout.split()
            if containers:
                docker("rm", "-f", "-v", *containers, timeout=120)
            for kind in ("volume", "network"):
                leftovers = docker(kind, "ls", "-q", "--filter", label).stdout.split()
                if leftovers:
                    docker(kind, "rm", *leftovers, check=False)


_prepared: dict[str, float] = {}


def prepare_engine(timings: dict[str, float]) -> None:
    """An engine, Compose and the stand-in base images, once per session; stale projects removed."""
    if not _prepared and os.environ.get("CI") and os.geteuid() == 0:
        # In CI (root, as .ci/run is): install Docker, Compose and debootstrap if missing; start dockerd.
        script = str(ROOT / ".ci" / "ensure-docker")
        ensured = subprocess.run(["bash", script], capture_output=True, text=True, timeout=1200)
        assert ensured.returncode == 0, ensured.stderr
    need(
        shutil.which("docker-compose") is not None, "docker-compose is not installed (bash .ci/ensure-docker)"
    )
    need(shutil.which("debootstrap") is not None, "debootstrap is not installed (bash .ci/ensure-docker)")
    engine = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=30)
    need(
        engine.returncode == 0, f"no Docker engine answers (bash .ci/ensure-docker): {engine.stderr.strip()}"
    )
    if "stand-ins" not in _prepared:
        remove_stale_projects()
        started = time.monotonic()
        proc = subprocess.run(["bash", str(STANDINS)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        _prepared["stand-ins"] = time.monotonic() - started
    timings["stand-in base images"] = _prepared["stand-ins"]


def build_image(project: Project, timings: dict[str, float]) -> None:
    """fanout's image from the project's Dockerfile, through Compose, once per session."""
    if "image" not in _prepared:
        started = time.monotonic()
        # The image the fanout services share.
        project("build", "worker", timeout=900)
        _prepared["image"] = time.monotonic() - started
        assert docker("image", "inspect", f"fanout:{IMAGE_TAG}").returncode == 0
    timings["image build"] = _prepared["image"]


def stack_env(**extra: str) -> dict[str, str]:
    """.env for a test project: .env.example, the test's secrets and settings, the stand-in images."""
    env = read_env_file(ENV_EXAMPLE) | SETTINGS
    env |= {"REDIS_PASSWORD": REDIS_PASSWORD, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    env |= {"PYTHON_IMAGE": PYTHON_STANDIN, "REDIS_IMAGE": REDIS_STANDIN, "FANOUT_IMAGE_TAG": IMAGE_TAG}
    env |= {"PROMETHEUS_IMAGE": PROMETHEUS_STANDIN}
    # One CPU per worker container: --concurrency=auto must then give one pool process each.
    env |= {"FLOWER_PORT": str(free_port()), "FANOUT_WORKER_CPUS": "1"}
    env |= {"EXPORTER_PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port())}
    return env | extra


def assert_every_item_once(proc: subprocess.Popen[str], out: str, timeout: float = 240) -> dict[str, Any]:
    """The resize of /data/in that ``proc`` runs succeeded, with each input once, in order."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {stderr[-2000:]}"
    document: dict[str, Any] = json.loads(stdout)
    assert (document["total"], document["succeeded"], document["failed"]) == (IMAGES, IMAGES, 0), stderr
    sources = [r["source"] for r in document["results"]]
    assert sources == [f"/data/in/img-{i:03d}.jpg" for i in range(IMAGES)]
    destinations = [r["destination"] for r in document["results"]]
    assert len(set(destinations)) == IMAGES and all(d.startswith(out + "/") for d in destinations)
    return document
