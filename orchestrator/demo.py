"""``fanout demo``: the main job in one command."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from orchestrator import builtin, render
from orchestrator.discovery import list_workers
from orchestrator.inputs import plan_images
from orchestrator.local import LocalWorker, available_cores
from orchestrator.plan import Plan
from orchestrator.samples import make_photos
from orchestrator.send import check_redis, send
from workers.app import app
from workers.fanin import OutcomeDoc
from workers.results import materialize
from workers.settings import get_settings


def _run(plan: Plan, timeout: float, progress: bool, label: str) -> tuple[OutcomeDoc, float]:
    started = time.perf_counter()
    job = send(plan, app=app)
    with render.progress_bar(progress, label, job.total, job.batch_size) as update:
        outcome = job.wait(timeout, update)
    return outcome.data, time.perf_counter() - started


def run_demo(
    directory: Path, photos: int, max_side: int, numbers: int, timeout: float, progress: bool
) -> int:
    """Run the demo; return the exit code (0 when every item succeeded)."""
    check_redis(get_settings())
    base = directory.resolve()
    photo_dir, out_dir = base / "photos", base / "resized"
    started = time.perf_counter()
    make_photos(photo_dir, photos)
    click.echo(
        f"generated {photos} sample photos (1920x1080 JPEG) in {photo_dir} "
        f"in {time.perf_counter() - started:.1f} s",
        err=True,
    )

    local: LocalWorker | None = None
    found = list_workers(app)
    if found:
        names = ", ".join(f"{w.name} (x{w.concurrency})" for w in found)
        click.echo(f"using the running workers: {names}", err=True)
    else:
        log = base / "worker.log"
        click.echo(f"no worker is running: starting a local one (log: {log})", err=True)
        local = LocalWorker(app, concurrency=available_cores(), name="demo", log_path=str(log)).start()
    failed = 0
    # `kill` (SIGTERM) of the demo unwinds through the `finally` below and stops the
    # worker cleanly; a `kill -9` cannot, and LocalWorker has the kernel stop it then.
    previous = _stop_on_sigterm()
    try:
        images = plan_images([photo_dir], out_dir)
        plan = builtin.resize(images.pairs, max_side, str(out_dir))
        outcome, elapsed = _run(plan, timeout, progress, "resizing photos")
        outcome = materialize(outcome)  # a demo's runs are small enough to hold
        failed += outcome["failed"]
        click.echo(render.summary(outcome, elapsed), err=True)
        render.write_errors(outcome, sys.stderr)
        for record in [r for r in outcome["results"] if r][:3]:
            click.echo(
                f"  {Path(record['source']).name} -> {record['destination']} "
                f"({record['width']}x{record['height']}, {record['bytes']:,} bytes)"
            )
        click.echo(f"  ... manifest of all {outcome['total']}: {out_dir / 'manifest.json'}")
        click.echo(f"  contact sheet (every photo in input order): {out_dir / 'contact-sheet.jpg'}")

        outcome, elapsed = _run(builtin.double(list(range(numbers))), timeout, progress, "doubling numbers")
        outcome = materialize(outcome)  # a demo's runs are small enough to hold
        failed += outcome["failed"]
        click.echo(render.summary(outcome, elapsed), err=True)
        results = outcome["results"]
        shown = ", ".join(map(str, results[:5]))
        click.echo(f"  doubled 0..{numbers - 1}: [{shown}, ..., {results[-1]}] (in input order)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if local is not None:
            click.echo("stopping the local worker", err=True)
            local.stop()
    click.echo(f"outputs: {out_dir}")
    return 1 if failed else 0


def _stop_on_sigterm() -> signal.Handlers | Callable[[int, FrameType | None], Any] | int | None:
    """Make SIGTERM raise SystemExit (exit 143) in the main thread; return the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, leave)
