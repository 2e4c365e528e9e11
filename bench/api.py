"""``python -m bench.api``: the public API against the CLI, and what a cancel costs.

* ``fanout.map`` with a user's doubling task over 1,000,000 integers (auto batch),
  beside ``fanout double --range 1000000`` in the same run: each a fresh process,
  timed as a whole command (what a user waits for) and by its own sent-to-fan-in
  figure, with the process's peak RSS;
* a 10,000-item job of 50 ms items cancelled once its first batch is done: the
  time from the cancel to the job's end, and how many items finished after the
  cancel (each item returns the time it finished);

It starts its own worker (1 x 2 processes, with this module on FANOUT_IMPORTS)
and refuses to run if other workers listen on the database.
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

N = 1_000_000


@fanout.task(name="bench.api.double", batch_size=10_000)
def double(value: int) -> int:
    """The doubling a user would write: the same work as the built-in job."""
    return value * 2


@fanout.task(name="bench.api.stamp")
def stamp(seconds: float) -> float:
    """Sleep ``seconds``, then return when the item finished (wall clock)."""
    time.sleep(seconds)
    return time.time()


MAP_SCRIPT = """
import json, sys, time
import fanout
from bench.api import double
n = int(sys.argv[1])
started = time.perf_counter()
outcome = fanout.map(double, range(n))
elapsed = time.perf_counter() - started
assert outcome.ok and outcome.results[-1] == 2 * (n - 1) and outcome.results[:3] == [0, 2, 4]
print(json.dumps({"elapsed_s": elapsed}))
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``command``; return its wall time, its peak RSS (KiB) and its stdout."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"bench: {command[:4]} exited {process.returncode}")
    return wall, int(usage.ru_maxrss), text


def api_against_cli(n: int, runs: int, env: dict[str, str]) -> dict[str, Any]:
    cli = [sys.executable, "-m", "orchestrator", "double", "--range", str(n), "--json"]
    api = [sys.executable, "-c", MAP_SCRIPT, str(n)]
    rows: dict[str, Any] = {"cli": [], "api": []}
    for _ in range(runs):
        wall, rss, text = timed(cli, env)
        document = json.loads(text)
        assert document["failed"] == 0 and document["results"][-1] == 2 * (n - 1)
        rows["cli"].append({"wall_s": wall, "elapsed_s": document["elapsed_s"], "peak_rss_kib": rss})
        wall, rss, text = timed(api, env)
        rows["api"].append({"wall_s": wall, "elapsed_s": json.loads(text)["elapsed_s"], "peak_rss_kib": rss})
    return rows


def cancel_figures(
    items: int, seconds: float, batch_size: fanout.BatchSize, runs: int
) -> list[dict[str, Any]]:
    found = []
    for _ in range(runs):
        job = fanout.submit(stamp, [seconds] * items, batch_size=batch_size)
        deadline = time.monotonic() + 120
        while job.progress().batches_done < 1:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the cancel job never started")
            time.sleep(0.01)
        cancelled_at, cancelled_mono = time.time(), time.monotonic()
        job.cancel()
        outcome = job.wait(timeout=600)
        ended = time.monotonic() - cancelled_mono
        finished = [r for r in outcome.results if r is not None]
        found.append(
            {
                "to_end_s": ended,
                "done": len(finished),
                "finished_after_cancel": sum(1 for r in finished if r > cancelled_at),
                "cancelled": sum(1 for f in outcome.errors if f.error == "cancelled"),
            }
        )
    return found


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--n", "n", type=click.IntRange(min=1), default=N, show_default=True, help="Items for the map runs."
)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per figure.")
@out_option("Where api.json goes.")
def main(n: int, runs: int, out: Path) -> None:
    """The public API beside the CLI, and the cost of a cancel (see the module's docstring)."""
    from orchestrator.discovery import list_workers
    from orchestrator.local import LocalWorker
    from workers.app import app

    if list_workers(app):
        raise SystemExit("bench: workers already listen on this Redis database; use another FANOUT_REDIS_URL")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FANOUT_IMPORTS": "bench.api", "PYTHONPATH": os.getcwd()}
    worker = LocalWorker(app, 2, "bench-api", env, str(out / "worker-api.log"), ["--loglevel", "WARNING"])
    with worker:
        rows = api_against_cli(n, runs, env)
        cancels = {
            "auto": cancel_figures(10_000, 0.05, "auto", runs),
            "batch_size_1": cancel_figures(10_000, 0.05, 1, runs),
        }
    document = {"n": n, "runs": runs, "map_vs_double": rows, "cancel_10000_items_of_50ms": cancels}
    (out / "api.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"| {n:,} items | whole command, s | items/s (sent to fan-in) | peak RSS, MB |")
    print("| --- | ---: | ---: | ---: |")
    for name, label in (("api", "`fanout.map(double, range(n))`"), ("cli", "`fanout double --range n`")):
        wall, elapsed = median(rows[name], "wall_s"), median(rows[name], "elapsed_s")
        print(
            f"| {label} | {wall:.2f} | {n / elapsed:,.0f} | {median(rows[name], 'peak_rss_kib') / 1024:.0f} |"
        )
    print()
    print("| cancel, 10,000 items of 50 ms | to end, s | finished after the cancel | done | cancelled |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, found in cancels.items():
        to_end, after = median(found, "to_end_s"), median(found, "finished_after_cancel")
        done, cancelled = median(found, "done"), median(found, "cancelled")
        print(f"| batch size {name} | {to_end:.2f} | {after:.0f} | {done:.0f} | {cancelled:.0f} |")


if __name__ == "__main__":
    main()
