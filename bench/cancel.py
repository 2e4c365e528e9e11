"""``python -m bench.cancel``: how long ``fanout cancel`` takes, from the command to the job's end.

A real worker (2 processes) on the Redis at FANOUT_REDIS_URL (a database no other
worker uses); each run sends a job of one-item batches of a 0.05 s item through
fanout's own send path, waits for its first batches, then runs ``fanout cancel
JOB_ID`` as a user does (a fresh process, which takes the queued batches off the
queue in steps of ``PURGE_LIMIT`` messages and waits for the fan-in) and times
the whole command.  Each case is a queue size; ``by reference`` cases keep their
inputs and parts in a results location (one input file a batch), as a job of
200,000 items or more does.  The outcome is checked (every item done or cancelled,
once) before a figure counts.

``--items N`` adds the case of the issue that asked for this: a doubling job of N
items by reference (``fanout double --range N``, ``--items-batch`` to a batch), sent with
the worker's consumer off and cancelled a second after it is on again, most of it still
queued; its fan-in then holds millions of items not run.  The figure is the whole
``fanout cancel`` command again, and its outcome must be ``cancelled`` with every item
counted once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

import fanout
from bench import out_option


@fanout.task(name="bench.cancel.nap")
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def run_once(n: int, by_reference: bool, root: str) -> dict[str, Any]:
    """Send ``n`` one-item batches, cancel with ``fanout cancel`` once some are done; time it."""
    from dataclasses import replace

    from orchestrator.follow import batches_done
    from orchestrator.plan import prepare
    from orchestrator.send import publish, spec_of
    from workers import results
    from workers.app import app

    plan = prepare(replace(spec_of(nap), results_root=root), [0.05] * n, by_reference=by_reference)
    group_id = publish(app, plan, 1).group_id
    deadline = time.monotonic() + 120
    while batches_done(app, group_id) < 10:
        if time.monotonic() > deadline:
            raise SystemExit("bench: the job did not start within 120 s")
        time.sleep(0.05)
    queued = int(app.backend.client.llen("fanout"))
    wall, _ = timed_cancel(plan.job_id)
    meta = app.backend.get_task_meta(plan.job_id)
    outcome = results.materialize(meta["result"])
    failed = {e["index"] for e in outcome["errors"]}
    assert {e["error"] for e in outcome["errors"]} == {"cancelled"}, "an item failed otherwise"
    assert all((outcome["results"][i] is None) == (i in failed) for i in range(n)), "wrong outcome"
    return {"wall_s": wall, "queued": queued, "cancelled": len(failed)}


def timed_cancel(job_id: str) -> tuple[float, str]:
    """``fanout cancel JOB_ID`` as a user runs it (a fresh process): its wall time and what it printed."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "cancel", job_id, "--timeout", "600"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"bench: fanout cancel exited {done.returncode}: {done.stderr}")
    return wall, done.stdout.strip()


def run_items(n: int, batch: int) -> dict[str, Any]:
    """A doubling job of ``n`` items by reference, cancelled a second after it is sent; time it."""
    from orchestrator import builtin
    from orchestrator.jobs import Job
    from orchestrator.send import publish
    from workers import results
    from workers.app import app

    queue = app.conf.task_default_queue
    # Sent with the worker's consumer off (a send of 200,000 messages takes a while, and the
    # worker would run most of them meanwhile); on again a second before the cancel.
    app.control.cancel_consumer(queue, reply=True, timeout=5)
    try:
        job = publish(app, builtin.double(range(n)), batch)
    finally:
        app.control.add_consumer(queue, reply=True, timeout=5)
    time.sleep(1.0)
    wall, printed = timed_cancel(job.job_id)
    outcome = Job.attach(job.job_id, app).wait(60).data
    cancelled = results.failed_for(outcome, "cancelled")
    assert outcome.get("stopped") == "cancelled" and outcome["total"] == n, "not cancelled"
    assert cancelled == outcome["failed"] and outcome["succeeded"] + cancelled == n, "wrong counts"
    return {
        "wall_s": wall,
        "queued": cancelled // batch,
        "cancelled": cancelled,
        "printed": printed,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per case.")
@click.option("--sizes", default="10000,50000", show_default=True, help="Batches per job, comma-separated")
@click.option(
    "--items", type=click.IntRange(min=0), default=0, help="Also cancel a doubling job of this many items."
)
@click.option(
    "--items-batch", type=click.IntRange(min=1), default=10_000, show_default=True, help="Its batch size."
)
@out_option("Where cancel.json goes.")
def main(runs: int, sizes: str, items: int, items_batch: int, out: Path) -> None:
    """Time ``fanout cancel`` (see the module's docstring)."""
    from orchestrator.discovery import list_workers
    from orchestrator.local import LocalWorker
    from workers.app import app
    from workers.purge import PURGE_LIMIT

    if list_workers(app):
        raise SystemExit("bench: workers already listen on this Redis database; use another FANOUT_REDIS_URL")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FANOUT_IMPORTS": "bench.cancel", "PYTHONPATH": os.getcwd()}
    log = str(out / "worker-cancel.log")
    worker = LocalWorker(app, 2, "bench-cancel", env, log, ["--loglevel", "WARNING"])
    rows: dict[str, list[dict[str, Any]]] = {}
    with worker, tempfile.TemporaryDirectory(prefix="bench-cancel-") as root:
        for n in (int(size) for size in sizes.split(",") if size.strip()):
            for by_reference in (False, True):
                name = f"{n} batches{' by reference' if by_reference else ''}"
                rows[name] = [run_once(n, by_reference, root) for _ in range(runs)]
        if items:
            name = f"doubling {items:,} items by reference, {items_batch:,} a batch"
            rows[name] = [run_items(items, items_batch) for _ in range(runs)]
    (out / "cancel.json").write_text(
        json.dumps({"runs": runs, "purge_limit": PURGE_LIMIT, "cases": rows}, indent=2) + "\n"
    )
    print("| job | queued at the cancel | `fanout cancel`, whole command, s | queued batches a second |")
    print("| --- | ---: | ---: | ---: |")
    for name, found in rows.items():
        wall = [row["wall_s"] for row in found]
        queued = statistics.median(row["queued"] for row in found)
        median = statistics.median(wall)
        print(f"| {name} | {queued:,.0f} | {median:.1f} (max {max(wall):.1f}) | {queued / median:,.0f} |")


if __name__ == "__main__":
    main()
