"""What one task costs the worker: task events, the log level, and the batch size of the image job.

``python -m bench.pertask`` starts a worker of its own (2 pool processes) for
each variant, in turn, round after round, so that each variant meets the same
machine load:

- **per task**: ``fanout double --range N --batch-size 1`` (N tasks doing
  nothing), with task events on and off, at log level INFO and WARNING; the
  figure is the job's own time (``elapsed_s``) per task, in ms;
- **batch size**: ``fanout resize`` of generated 1920x1080 photos to 256 px with
  its manifest and sheet (the whole command, a fresh process) at each
  ``--batch-size``, beside ``ProcessPoolExecutor(2)`` running the same resize
  function (``python -m bench.reference pool-resize``), as the ratio of their
  wall times.

Events off is measured by a worker whose app has ``worker_send_task_events``
set to False before it starts; fanout itself always sends them (Flower needs
them).  Writes ``pertask.json``; every figure is a median over ``--runs``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bench.suite import fanout_cli, reference
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


def _with_worker(events: bool, loglevel: str, log: Path, run: Callable[[], float]) -> float:
    worker = _Worker(events, loglevel, str(log)).start(timeout=60)
    try:
        return run()
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
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
)
def main(
    tasks: int, photos: int, noisy: bool, batch_sizes: str, runs: int, skip_events: bool, out: Path
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

        def doubled() -> float:
            doc, _, _ = fanout_cli(env, ["double", "--range", str(tasks), "--batch-size", "1"], 600)
            if doc["failed"] or doc["results"] != [2 * i for i in range(tasks)]:
                raise SystemExit("bench.pertask: doubling came back incomplete")
            return float(doc["elapsed_s"]) / tasks * 1000

        for round_ in range(runs):
            for events, level in variants:
                ms = _with_worker(events, level, log, doubled)
                per_task[f"events={events} {level}"].append(round(ms, 4))
                click.echo(f"per task, round {round_ + 1}: events={events} {level}: {ms:.3f} ms", err=True)
        document["per_task_ms"] = {k: {"median": _median(v), "runs": v} for k, v in per_task.items()}

    kind = "noisy" if noisy else "clean"
    source = work / f"photos-{photos}-{kind}"
    if len(list(source.glob("*.jpg"))) != photos:
        click.echo(f"generating {photos} {kind} photos in {source}", err=True)
        make_photos(source, photos, noisy=noisy)
    sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    walls: dict[str, list[float]] = {"pool": [], **{f"batch {b}": [] for b in sizes}}

    def fresh(name: str) -> str:
        target = work / "out" / name
        shutil.rmtree(target, ignore_errors=True)
        return str(target)

    def images() -> float:
        for round_ in range(runs):
            _, wall = reference(env, ["pool-resize", str(source), fresh("pool"), "--processes", "2"], 600)
            walls["pool"].append(round(wall, 3))
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
                doc, wall, _ = fanout_cli(env, args, 600)
                if doc["failed"] or doc["total"] != photos:
                    raise SystemExit(f"bench.pertask: resize failed for {doc['failed']} images")
                walls[f"batch {b}"].append(round(wall, 3))
            line = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in walls.items())
            click.echo(f"images ({kind}), round {round_ + 1}: {line}", err=True)
        return 0.0

    _with_worker(True, "INFO", log, images)
    pool = statistics.median(walls["pool"])
    document[f"resize_{kind}_{photos}"] = {
        k: {"median_s": _median(v), "ratio_to_pool": round(pool / statistics.median(v), 3), "runs": v}
        for k, v in walls.items()
    }
    document["load_average"] = os.getloadavg()
    shutil.rmtree(work / "out", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "pertask.json"
    previous = json.loads(target.read_text()) if target.exists() else {}
    target.write_text(json.dumps({**previous, **document}, indent=2) + "\n")
    click.echo(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
