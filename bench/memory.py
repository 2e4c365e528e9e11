"""``python -m bench.memory``: memory against N for ``fanout double --range N``, or for the word-count fold.

``--job wordcount`` measures the fold instead: ``python -m bench.wordfold N`` passes a
generator of N lines to ``fanout.map(examples.wordcount.words, ...)`` (a ``Counter``
folded on the workers, merged as the batches arrive) and checks the value against a
local ``collections.Counter``; the worker imports ``examples.wordcount``.

For each N, on a Redis of its own (a fresh ``redis-server`` on a free port, so
nothing else moves its figures) and a fresh worker (``-c 2``):

* **client peak**: the ``fanout double --range N`` process's peak RSS
  (``wait4``'s ``ru_maxrss``), its stdout going to a file;
* **worker peak**: the largest sum of the RSS of every process of the worker
  (main process and pool), sampled every 0.1 s, and the largest single
  process's own peak (``VmHWM``);
* **Redis peak growth**: the largest ``used_memory`` (INFO memory, sampled
  every 0.1 s) less the value before the command started;
* **Redis left**: after the job ended, the bytes (``MEMORY USAGE``) of every
  key that is not the worker's registration or the queue's bindings;
* the wall time of the whole command, items/s over it, and the bytes the
  job left in its results location.

The output is checked (N lines, the sum of ``2i``) before a row counts.
``--code DIR`` runs another checkout (its ``.venv``), e.g. the code before
results went by reference, for a before/after table.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import redis

from bench import out_option

MB = 1024 * 1024
#: Keys that are not a job's: the worker's registration and kombu's queue bindings.
NOT_THE_JOBS = (b"fanout:worker", b"_kombu.binding.")


@dataclass
class Row:
    n: int
    code: str
    wall_s: float
    items_per_s: float
    #: From sending to the fan-in, as the command's summary line says; the rest of
    #: the wall time is starting up and writing the N output lines.
    job_s: float
    client_peak_mb: float
    worker_peak_mb: float
    worker_process_peak_mb: float
    redis_growth_mb: float
    redis_left_bytes: int
    redis_left_keys: int
    results_mb: float
    ok: bool
    #: The machine's 1-minute load average when the command ended (2 cores: above 2,
    #: something else competed for them, and the times mean less).
    load_1m: float = 0.0
    #: FANOUT_BY_REFERENCE_ITEMS for the run (None: fanout's default).
    by_reference_items: int | None = None
    #: What ran: "double" (``fanout double --range N``) or "wordcount" (the fold over N lines).
    job: str = "double"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A ``redis-server`` of the benchmark's own, without persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> redis.Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise click.ClickException("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.ping()
                return client
            except redis.RedisError:
                time.sleep(0.1)
        raise click.ClickException("the benchmark's redis-server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)


def _group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (the worker and its pool)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Every 0.1 s: the worker's summed RSS, each worker process's VmHWM, Redis's used_memory."""

    def __init__(self, client: redis.Redis, worker_pgid: int) -> None:
        super().__init__(daemon=True)
        self.client, self.pgid = client, worker_pgid
        self.stop = threading.Event()
        self.worker_peak_kb = 0
        self.process_peak_kb = 0
        self.redis_peak = 0

    def sample(self) -> None:
        pids = _group_pids(self.pgid)
        self.worker_peak_kb = max(self.worker_peak_kb, sum(_status_kb(p, "VmRSS") for p in pids))
        self.process_peak_kb = max([self.process_peak_kb, *(_status_kb(p, "VmHWM") for p in pids)])
        with contextlib.suppress(redis.RedisError):
            self.redis_peak = max(self.redis_peak, int(self.client.info("memory")["used_memory"]))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.1)
        self.sample()


def _python(code: Path) -> str:
    venv = code / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _env(
    code: Path, redis_url: str, results: Path, threshold: int | None = None, imports: str = ""
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FANOUT_REDIS_URL=redis_url,
        FANOUT_RESULTS_URL=str(results),
        PYTHONPATH=str(code),
    )
    for name in ("FANOUT_BROKER_URL", "FANOUT_RESULT_BACKEND", "FANOUT_BY_REFERENCE_ITEMS", "FANOUT_QUEUE"):
        env.pop(name, None)
    if threshold is not None:
        env["FANOUT_BY_REFERENCE_ITEMS"] = str(threshold)
    if imports:
        env["FANOUT_IMPORTS"] = imports
    return env


def _start_worker(code: Path, env: dict[str, str], client: redis.Redis, log: Path) -> subprocess.Popen[bytes]:
    name = f"membench-{uuid.uuid4().hex[:6]}@%h"
    with log.open("wb") as fh:
        worker = subprocess.Popen(
            [_python(code), "-m", "celery", "-A", "workers", "worker", "-c", "2", "-n", name,
             "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
            cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if client.keys("fanout:worker:*"):
            return worker
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited: see {log}")
        time.sleep(0.2)
    raise click.ClickException(f"the worker did not register within 60 s: see {log}")


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(worker.pid, 15)
        worker.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(worker.pid, 9)
        worker.wait(10)


def _left_for_the_job(client: redis.Redis) -> tuple[int, int]:
    """(bytes, keys) still in Redis that are not the worker's or the queue's bindings."""
    total = keys = 0
    for key in client.scan_iter(count=1000):
        if key.startswith(NOT_THE_JOBS):
            continue
        keys += 1
        total += int(client.memory_usage(key, samples=0) or 0)
    return total, keys


def _job_seconds(stderr: str) -> float:
    """The seconds in the summary line ("double: N items, ... in 7.29 s (...)"), or 0."""
    match = re.search(r" failed in ([0-9.]+) s ", stderr)
    return float(match.group(1)) if match else 0.0


def _check_output(path: Path, n: int) -> bool:
    """N lines, each 2i: counted and summed as it is read."""
    count = total = 0
    with path.open("rb") as fh:
        for line in fh:
            total += int(line)
            count += 1
    return count == n and total == n * (n - 1)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _double(n: int, timeout: float) -> list[str]:
    return ["-m", "orchestrator", "double", "--range", str(n), "--no-progress", "--timeout", str(timeout)]


def _wordcount(n: int, timeout: float) -> list[str]:
    return ["-m", "bench.wordfold", str(n), str(timeout)]


#: The client's arguments for each job, and the worker's FANOUT_IMPORTS for it.
JOBS: dict[str, tuple[Callable[[int, float], list[str]], str]] = {
    "double": (_double, ""),
    "wordcount": (_wordcount, "examples.wordcount"),
}


JOB_TITLES = {"wordcount": "word-count fold over N lines"}


def _fold_seconds(path: Path) -> float:
    """The seconds ``bench.wordfold`` reports, from sending to the folded value, or 0."""
    try:
        return float(json.loads(path.read_text().strip().splitlines()[-1])["seconds"])
    except (ValueError, KeyError, IndexError, OSError):
        return 0.0


def measure(
    n: int,
    code: Path,
    work: Path,
    timeout: float,
    report: Any,
    threshold: int | None = None,
    job: str = "double",
) -> Row:
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results"
    own = OwnRedis(work / "redis")
    command, imports = JOBS[job]
    with own as client:
        env = _env(code, own.url, results, threshold, imports)
        worker = _start_worker(code, env, client, work / "worker.log")
        try:
            time.sleep(1.0)  # let the worker settle: its start-up is not the job's
            baseline = int(client.info("memory")["used_memory"])
            sampler = Sampler(client, worker.pid)
            sampler.redis_peak = baseline
            sampler.start()
            out = work / "stdout"
            started = time.perf_counter()
            with out.open("wb") as fh, (work / "client.err").open("wb") as err:
                client_proc = subprocess.Popen(
                    [_python(code), *command(n, timeout)], cwd=code, env=env, stdout=fh, stderr=err
                )
                _, status, usage = os.wait4(client_proc.pid, 0)
            wall = time.perf_counter() - started
            load = os.getloadavg()[0]
            client_proc.returncode = os.waitstatus_to_exitcode(status)
            time.sleep(0.5)  # a last sample after the fan-in
            sampler.stop.set()
            sampler.join()
            left, left_keys = _left_for_the_job(client)
            # The fold's client checks its value itself (against a local Counter): exit 0 if equal.
            ok = client_proc.returncode == 0 and (job != "double" or _check_output(out, n))
            if not ok:
                report(f"N={n}: exit {client_proc.returncode}; see {work}/client.err")
            row = Row(
                n=n,
                code=str(code),
                wall_s=round(wall, 2),
                items_per_s=round(n / wall),
                job_s=_job_seconds((work / "client.err").read_text(errors="replace"))
                if job == "double"
                else _fold_seconds(out),
                client_peak_mb=round(usage.ru_maxrss / 1024, 1),
                worker_peak_mb=round(sampler.worker_peak_kb / 1024, 1),
                worker_process_peak_mb=round(sampler.process_peak_kb / 1024, 1),
                redis_growth_mb=round((sampler.redis_peak - baseline) / MB, 1),
                redis_left_bytes=left,
                redis_left_keys=left_keys,
                results_mb=round(_du(results) / MB, 1),
                ok=ok,
                load_1m=round(load, 2),
                by_reference_items=threshold,
                job=job,
            )
        finally:
            _stop_worker(worker)
    out.unlink(missing_ok=True)
    shutil.rmtree(results, ignore_errors=True)
    return row


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| job | N | wall (s) | items/s | job (s) | client peak (MB) | worker peak, all processes (MB) | "
        "largest worker process (MB) | Redis peak growth (MB) | Redis left for the job | "
        "results location (MB) | output checked | load (1 min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.job} | {r.n:,} | {r.wall_s:.1f} | {r.items_per_s:,} | {r.job_s:.1f} | "
            f"{r.client_peak_mb:.0f} | "
            f"{r.worker_peak_mb:.0f} | {r.worker_process_peak_mb:.0f} | {r.redis_growth_mb:.1f} | "
            f"{r.redis_left_bytes:,} B in {r.redis_left_keys} keys | {r.results_mb:.0f} | "
            f"{'yes' if r.ok else 'NO'} | {r.load_1m:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = sorted(rows, key=lambda r: r.n)
    xs = [r.n for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, values, marker in (
        ("client peak RSS", [r.client_peak_mb for r in rows], "o"),
        ("worker peak RSS (all processes)", [r.worker_peak_mb for r in rows], "s"),
        ("Redis peak growth (used_memory)", [r.redis_growth_mb for r in rows], "^"),
    ):
        ax.plot(xs, values, marker=marker, label=label)
    for ceiling, label in ((200, "client ceiling"), (300, "worker ceiling"), (50, "Redis ceiling")):
        ax.axhline(ceiling, linestyle=":", linewidth=1, color="grey")
        ax.annotate(label, (xs[0], ceiling), textcoords="offset points", xytext=(2, 2), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("N (items)")
    ax.set_ylabel("MB")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--n",
    "ns",
    default="1000000,10000000,100000000",
    show_default=True,
    help="Comma-separated Ns for `fanout double --range N`.",
)
@click.option(
    "--code",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path(__file__).resolve().parent.parent,
    show_default="this checkout",
    help="The checkout whose fanout runs (its .venv/bin/python if there is one).",
)
@click.option("--timeout", type=float, default=3600, show_default=True, help="Bound on each run, seconds.")
@click.option(
    "--by-reference-items",
    "threshold",
    type=click.IntRange(min=1),
    help="FANOUT_BY_REFERENCE_ITEMS for the runs [default: fanout's own], to compare the two paths.",
)
@click.option(
    "--job",
    type=click.Choice(sorted(JOBS)),
    default="double",
    show_default=True,
    help="double: `fanout double --range N`; wordcount: the word-count fold over N lines (bench.wordfold).",
)
@out_option("Where memory.json and memory.png (memory-wordcount.* for --job wordcount) go.")
def main(ns: str, code: Path, timeout: float, threshold: int | None, job: str, out: Path) -> None:
    """Measure client, worker and Redis memory against N for `fanout double --range N` (or the fold)."""

    def report(line: str) -> None:
        click.echo(f"bench.memory: {line}", err=True)

    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fanout-membench-") as tmp:
        for n in (int(part.replace("_", "")) for part in ns.split(",") if part.strip()):
            report(f"N={n:,} ({code})")
            row = measure(n, code.resolve(), Path(tmp) / str(n), timeout, report, threshold, job)
            report(json.dumps(asdict(row)))
            rows.append(row)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    document = {
        "when": when,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "worker": "1 worker x 2 pool processes",
        "rows": [asdict(r) for r in rows],
    }
    stem, what = (
        ("memory", "fanout double --range N") if job == "double" else (f"memory-{job}", JOB_TITLES[job])
    )
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    png = plot(rows, out / f"{stem}.png", f"{what}: memory, {os.cpu_count()} CPUs, {when}")
    click.echo(table(rows))
    click.echo(f"\nresults: {out / f'{stem}.json'}" + (f", plot: {png}" if png else " (no matplotlib)"))
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
