"""What one task costs the worker: task events, the log level, and the batch size of the image job.

``python -m bench.pertask`` starts a worker of its own (2 pool processes) for
each variant, in turn, round after round, so that each variant meets the same
machine load:

- **per task**: ``fanout double --range N --batch-size 1`` (N tasks doing
  nothing), with task events on and off, at log level INFO and WARNING; the
  figures are the CPU time the worker's main process and its pool processes
  spent per task (from ``/proc``: on a shared machine CPU time is far steadier
  than wall time), and the job's own time (``elapsed_s``) per task, in ms;
- **batch size**: ``fanout resize`` of generated 1920x1080 photos to 256 px with
  its manifest and sheet (the whole command, a fresh process) at each
  ``--batch-size``, beside ``ProcessPoolExecutor(2)`` running the same resize
  function (``python -m bench.reference pool-resize``), as the ratio of their
  wall times, and of the CPU time each used (the command and its children;
  for fanout also the worker's processes): on a loaded machine the CPU ratio
  says more than the wall ratio, which favours fanout's greater number of
  processes there.

Events off is measured by a worker whose app has ``worker_send_task_events``
set to False before it starts; fanout itself always sends them (Flower needs
them).  Writes ``pertask.json``; every figure is a median over ``--runs``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bench import out_option
from bench.suite import fanout_cli
from orchestrator.local import LocalWorker

#: A worker whose app sends no task events (for the measurement only).
_NO_EVENTS = (
    "import sys; from workers.app import app; "
    "app.conf.update(worker_send_task_events=False); app.worker_main(['worker', *sys.argv[1:]])"
)


class _Worker(LocalWorker):
    def __init__(self, events: bool, loglevel: str, log_path: str) -> None:
        from workers.app import app

        super().__init__(app, 2, f"pertask-{os.getpid()}", log_path=log_path)
        self.events, self.loglevel = events, loglevel

    @property
    def command(self) -> list[str]:
        args = [
            "--loglevel", self.loglevel, "--concurrency", str(self.concurrency), "--without-gossip",
            "--without-mingle", "--hostname", self.node,
        ]  # fmt: skip
        if self.events:
            return [sys.executable, "-m", "celery", "-A", "workers", "worker", *args]
        return [sys.executable, "-c", _NO_EVENTS, *args]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _with_worker(
    events: bool, loglevel: str, log: Path, run: Callable[[int], float]
) -> tuple[float, float, float]:
    """``run()`` with a worker of its own up: its value, and the main and pool processes' CPU seconds."""
    worker = _Worker(events, loglevel, str(log)).start(timeout=60)
    assert worker.process is not None
    main_pid = worker.process.pid
    try:
        pool = _children(main_pid)
        before = _cpu_s(main_pid), sum(_cpu_s(p) for p in pool)
        value = run(main_pid)
        after = _cpu_s(main_pid), sum(_cpu_s(p) for p in pool)
        return value, after[0] - before[0], after[1] - before[1]
    finally:
        worker.stop()


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


@click.command()
@click.option("--tasks", type=click.IntRange(min=1), default=2000, show_default=True, help="One-item tasks.")
@click.option(
    "--photos", type=click.IntRange(min=1), default=2000, show_default=True, help="Photos to resize."
)
@click.option("--noisy/--clean", default=False, help="Photos with sensor-like noise (decoding dominates).")
@click.option("--batch-sizes", default="8,16,32", show_default=True, help="The resize --batch-size values.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--skip-events", is_flag=True, help="Only the batch-size rows.")
@click.option(
    "--loglevel", default="INFO", show_default=True, help="The worker's log level for the batch-size rows."
)
@out_option("Where pertask.json goes.")
def main(
    tasks: int,
    photos: int,
    noisy: bool,
    batch_sizes: str,
    runs: int,
    skip_events: bool,
    loglevel: str,
    out: Path,
) -> None:
    """Per-task costs (events, log level) and the image job's batch size, against FANOUT_REDIS_URL."""
    from orchestrator.samples import make_photos

    work = out.resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    log = work / "pertask-worker.log"
    document: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}

    if not skip_events:
        variants = [(e, level) for e in (True, False) for level in ("INFO", "WARNING")]
        per_task: dict[str, list[float]] = {f"events={e} {level}": [] for e, level in variants}
        main_cpu: dict[str, list[float]] = {k: [] for k in per_task}
        pool_cpu: dict[str, list[float]] = {k: [] for k in per_task}

        def doubled(pid: int) -> float:
            doc, _, _ = fanout_cli(env, ["double", "--range", str(tasks), "--batch-size", "1"], 600)
            if doc["failed"] or doc["results"] != [2 * i for i in range(tasks)]:
                raise SystemExit("bench.pertask: doubling came back incomplete")
            return float(doc["elapsed_s"]) / tasks * 1000

        for round_ in range(runs):
            for events, level in variants:
                key = f"events={events} {level}"
                ms, main_s, pool_s = _with_worker(events, level, log, doubled)
                per_task[key].append(round(ms, 4))
                main_cpu[key].append(round(main_s / tasks * 1000, 4))
                pool_cpu[key].append(round(pool_s / tasks * 1000, 4))
                click.echo(
                    f"per task, round {round_ + 1}: {key}: {ms:.3f} ms wall, CPU {main_cpu[key][-1]:.3f} ms "
                    f"main + {pool_cpu[key][-1]:.3f} ms pool",
                    err=True,
                )
        document["per_task_ms"] = {
            k: {
                "wall": _median(v), "main_cpu": _median(main_cpu[k]), "pool_cpu": _median(pool_cpu[k]),
                "runs": v, "main_cpu_runs": main_cpu[k], "pool_cpu_runs": pool_cpu[k],
            }
            for k, v in per_task.items()
        }  # fmt: skip

    kind = "noisy" if noisy else "clean"
    source = work / f"photos-{photos}-{kind}"
    if len(list(source.glob("*.jpg"))) != photos:
        click.echo(f"generating {photos} {kind} photos in {source}", err=True)
        make_photos(source, photos, noisy=noisy)
    sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    keys = ["pool", *(f"batch {b}" for b in sizes)]
    walls: dict[str, list[float]] = {k: [] for k in keys}
    cpus: dict[str, list[float]] = {k: [] for k in keys}

    def fresh(name: str) -> str:
        target = work / "out" / name
        shutil.rmtree(target, ignore_errors=True)
        return str(target)

    def images(pid: int) -> float:
        pool_pids = _children(pid)

        def worker_cpu() -> float:
            return _cpu_s(pid) + sum(_cpu_s(p) for p in pool_pids)

        for round_ in range(runs):
            wall, cpu = _command(env, [sys.executable, "-m", "bench.reference", "pool-resize", str(source),
                                       fresh("pool"), "--processes", "2"])  # fmt: skip
            walls["pool"].append(round(wall, 3))
            cpus["pool"].append(round(cpu, 3))
            for b in sizes:
                args = [
                    "resize",
                    str(source),
                    "--max-side",
                    "256",
                    "--batch-size",
                    str(b),
                    "--out",
                    fresh("fanout"),
                ]
                before = worker_cpu()
                wall, cpu = _command(
                    env, [sys.executable, "-m", "orchestrator", *args, "--json", "--no-progress"]
                )
                walls[f"batch {b}"].append(round(wall, 3))
                cpus[f"batch {b}"].append(round(cpu + worker_cpu() - before, 3))
                doc = json.loads((work / "stdout").read_text())
                if doc["failed"] or doc["total"] != photos:
                    raise SystemExit(f"bench.pertask: resize failed for {doc['failed']} images")
            line = ", ".join(f"{k} {walls[k][-1]:.2f} s ({cpus[k][-1]:.2f} s CPU)" for k in keys)
            click.echo(f"images ({kind}), round {round_ + 1}: {line}", err=True)
        return 0.0

    def _command(env: dict[str, str], command: list[str]) -> tuple[float, float]:
        """Run ``command``; its wall seconds and the CPU seconds it and its children used."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        with open(work / "stdout", "wb") as stdout:
            code = subprocess.run(
                command, env=env, stdout=stdout, stderr=subprocess.DEVNULL, timeout=900
            ).returncode
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if code != 0:
            raise SystemExit(f"bench.pertask: {' '.join(command)} exited {code}")
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    _with_worker(True, loglevel, log, images)
    ref_wall, pool_cpu_s = statistics.median(walls["pool"]), statistics.median(cpus["pool"])
    document[f"resize_{kind}_{photos}"] = {
        k: {
            "wall_s": _median(walls[k]), "wall_ratio": round(ref_wall / statistics.median(walls[k]), 3),
            "cpu_s": _median(cpus[k]), "cpu_ratio": round(pool_cpu_s / statistics.median(cpus[k]), 3),
            "wall_runs": walls[k], "cpu_runs": cpus[k],
        }
        for k in keys
    }  # fmt: skip
    document["load_average"] = os.getloadavg()
    shutil.rmtree(work / "out", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "pertask.json"
    previous = json.loads(target.read_text()) if target.exists() else {}
    target.write_text(json.dumps({**previous, **document}, indent=2) + "\n")
    click.echo(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
