"""What ``FANOUT_WAIT_REPLICAS=1`` costs: the same job with and without a WAIT for one replica.

``python -m bench.wait``: a master and a replica (``redis-server --replicaof``) of
its own on loopback ports, one worker with two pool processes, then ``fanout
double --range N --batch-size B`` run ``--runs`` times each way, alternating, each
a fresh process.  The figure is the median of the job's own time (``elapsed_s``,
sending to fan-in) with WAIT over without: a ratio, so the machine's speed cancels.
Many small batches is the worst case (one WAIT per batch's part).
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
import redis

from orchestrator.local import LocalWorker
from tests.faultkit import RedisServer, app_for


def _replica(directory: Path, master: RedisServer) -> RedisServer:
    replica = RedisServer(directory, persistent=False)
    replica.start()
    client = redis.Redis(host=replica.bind, port=replica.port)
    client.replicaof(master.bind, master.port)
    deadline = time.monotonic() + 30
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not catch up with its master within 30 s")
        time.sleep(0.1)
    client.close()
    return replica


def _run(url: str, n: int, batch: int, wait_replicas: int) -> float:
    env = {**os.environ, "FANOUT_REDIS_URL": url, "FANOUT_WAIT_REPLICAS": str(wait_replicas)}
    command = ["double", "--range", str(n), "--batch-size", str(batch), "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fanout double failed ({proc.returncode}): {proc.stderr[-2000:]}")
    outcome: dict[str, Any] = json.loads(proc.stdout)
    if outcome["results"] != [2 * i for i in range(n)]:
        raise RuntimeError("wrong results")
    return float(outcome["elapsed_s"])


@click.command()
@click.option("--n", default=20_000, show_default=True, help="Items per job.")
@click.option("--batch", default=20, show_default=True, help="Items per batch (one WAIT per batch).")
@click.option("--runs", default=5, show_default=True, help="Runs each way.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("docs/bench-wait.json"), show_default=True
)
def main(n: int, batch: int, runs: int, out: Path) -> None:
    """Measure the cost of FANOUT_WAIT_REPLICAS=1 as a ratio of job times."""
    with tempfile.TemporaryDirectory(prefix="fanout-bench-wait-") as tmp:
        work = Path(tmp)
        master = RedisServer(work / "master", persistent=False).start()
        replica = _replica(work / "replica", master)
        app = app_for(master.url)
        times: dict[str, list[float]] = {"0": [], "1": []}
        stats = redis.Redis(host=master.bind, port=master.port)
        try:
            for run in range(runs):
                for replicas in (0, 1):
                    # The setting is the worker's as well as the client's: a worker of each kind.
                    env = {**os.environ, "FANOUT_REDIS_URL": master.url}
                    env["FANOUT_WAIT_REPLICAS"] = str(replicas)
                    log = str(work / f"worker-{run}-{replicas}.log")
                    name = f"bench-wait-{replicas}"
                    local = LocalWorker(app, concurrency=2, name=name, env=env, log_path=log)
                    local.start(timeout=60)
                    try:
                        times[str(replicas)].append(_run(master.url, n, batch, replicas))
                    finally:
                        local.stop()
            # Proof that the WAITs ran (and only with the setting): one per batch's part, per
            # job's record and per outcome.
            waits = int(stats.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        finally:
            stats.close()
            replica.stop()
            master.stop()
    without, with_wait = statistics.median(times["0"]), statistics.median(times["1"])
    figures = {
        "n": n,
        "batch": batch,
        "batches": -(-n // batch),
        "runs": runs,
        "elapsed_s": times,
        "median_without_s": without,
        "median_with_wait_s": with_wait,
        "ratio": with_wait / without,
        "waits": waits,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    click.echo(
        f"{n} items in {figures['batches']} batches: {without:.3f} s without WAIT, {with_wait:.3f} s with "
        f"WAIT 1: ratio {figures['ratio']:.2f} (median of {runs}; {waits} WAITs); {out}"
    )


if __name__ == "__main__":
    main()
