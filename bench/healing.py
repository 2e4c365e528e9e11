"""``python -m bench.healing``: how soon a batch whose message Redis dropped is sent again.

A real worker (2 processes) on the Redis at FANOUT_REDIS_URL (a database no other
worker uses); each run sends a job of one-item batches through fanout's own send
path, then takes one queued batch's message off the queue, as kombu's ``BRPOP``
window or a failover drops one, and times the healer:

* ``stalled``: the last batch of a short job is dropped after the healer's first
  look at the job: it is noticed once the job stands still (STALL_S);
* ``moving``: an early batch of a long job is dropped while the job keeps moving:
  it is noticed at the next sweep (SWEEP_S).

Each is timed from the drop and from the job's last progress before the re-send.

Each row also gives the whole job's wall time beside the same job with nothing dropped.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import click

import fanout
from bench import out_option


@fanout.task(name="bench.healing.nap")
def nap(value: int, seconds: float = 0.0) -> int:
    time.sleep(seconds)
    return value


def _job(n: int, seconds: float) -> Any:
    from orchestrator.plan import prepare
    from orchestrator.send import spec_of

    return prepare(spec_of(nap, kwargs={"seconds": seconds}), list(range(n)))


def run_once(n: int, seconds: float, drop: int | None, drop_after: float) -> dict[str, float]:
    """One job of ``n`` batches; drop batch ``drop`` ``drop_after`` seconds in (None: drop nothing)."""
    from orchestrator.follow import batches_done, callback_meta
    from orchestrator.send import publish
    from workers import keys
    from workers.app import app

    client = app.backend.client
    plan = _job(n, seconds)
    began = time.monotonic()
    group_id = publish(app, plan, 1).group_id
    dropped_at = resent_at = None
    progress_at, last = began, 0
    while True:
        now = time.monotonic()
        if drop is not None and dropped_at is None and now - began >= drop_after:
            for raw in client.lrange("fanout", 0, -1):
                headers = json.loads(raw)["headers"]
                if headers.get("group") == group_id and headers.get("group_index") == drop:
                    client.lrem("fanout", 1, raw)
                    dropped_at = now
            if dropped_at is None:
                raise SystemExit(f"bench: batch {drop} was no longer queued {drop_after} s in")
        done = batches_done(app, group_id)
        if done > last:
            last, progress_at = done, now
        if resent_at is None and client.get(keys.healed(plan.job_id)):
            resent_at, stalled_at = now, progress_at
        meta = callback_meta(app, plan.job_id)
        if meta is not None and meta["status"] == "SUCCESS":
            outcome = meta["result"]
            assert outcome["failed"] == 0 and outcome["results"] == list(range(n)), "wrong outcome"
            break
        if now - began > 600:
            raise SystemExit("bench: the job did not complete within 600 s")
        time.sleep(0.02)
    row = {"wall_s": time.monotonic() - began}
    if dropped_at is not None:
        assert resent_at is not None, "completed without the healer"
        row["from_drop_s"] = resent_at - dropped_at
        row["from_stall_s"] = resent_at - stalled_at
    return row


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per row.")
@out_option("Where healing.json goes.")
def main(runs: int, out: Path) -> None:
    """Time the healer (see the module's docstring)."""
    from orchestrator.discovery import list_workers
    from orchestrator.local import LocalWorker
    from workers.app import app

    if list_workers(app):
        raise SystemExit("bench: workers already listen on this Redis database; use another FANOUT_REDIS_URL")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FANOUT_IMPORTS": "bench.healing", "PYTHONPATH": os.getcwd()}
    worker = LocalWorker(app, 2, "bench-heal", env, str(out / "worker-heal.log"), ["--loglevel", "WARNING"])
    cases = {
        # 30 batches of 0.5 s on 2 processes (7.5 s): the last one is dropped 4 s in, after
        # the healer's first look at the job; the job then stalls at its end.
        "stalled": (30, 0.5, 29, 4.0),
        # 300 batches of 0.2 s (30 s of work): an early one is dropped 1 s in.
        "moving": (300, 0.2, 20, 1.0),
    }
    rows: dict[str, Any] = {}
    with worker:
        for name, (n, seconds, drop, after) in cases.items():
            rows[name] = {
                "dropped": [run_once(n, seconds, drop, after) for _ in range(runs)],
                "intact": [run_once(n, seconds, None, after) for _ in range(runs)],
            }
    (out / "healing.json").write_text(json.dumps({"runs": runs, "cases": rows}, indent=2) + "\n")
    print("| case | sent again: from the drop, s | from the last progress, s | job wall, dropped / intact |")
    print("| --- | ---: | ---: | ---: |")
    for name, found in rows.items():
        from_drop = [row["from_drop_s"] for row in found["dropped"]]
        stall = [row["from_stall_s"] for row in found["dropped"]]
        wall = statistics.median(r["wall_s"] for r in found["dropped"])
        intact = statistics.median(r["wall_s"] for r in found["intact"])
        print(
            f"| {name} | {statistics.median(from_drop):.1f} (max {max(from_drop):.1f}) "
            f"| {statistics.median(stall):.1f} (max {max(stall):.1f}) | {wall:.1f} / {intact:.1f} |"
        )


if __name__ == "__main__":
    main()
