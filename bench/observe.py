"""``python -m bench.observe``: what watching costs: a scrape, ``fanout jobs``, and a job beside the exporter.

On the Redis at FANOUT_REDIS_URL (a database no other worker uses; it is flushed):

* **scrape**: the index holds ``--finished`` finished jobs and ``--running`` running
  ones (their records copied from one real job, their index entries, summaries and
  counts written as send, the workers and the fan-in write them), and the
  per-task counters of ``--tasks`` tasks; a ``fanout exporter`` process is
  scraped over HTTP ``--scrapes`` times; the median and the worst scrape, and
  ``fanout jobs`` (the newest 20 and the running) and ``fanout jobs --all --json``
  as whole commands.
* **beside a job**: a real worker (2 processes) runs a job of ``--items`` items of
  ``--item-ms`` each, in batches of ``--batch``, with no exporter and with one being
  scraped every ``--every`` seconds, interleaved (A, B, A, B) ``--runs`` times; the
  figure is the ratio of the median items/s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import click

import fanout
from bench import out_option


@fanout.task(name="bench.observe.work")
def work(value: int, ms: float = 0.0) -> int:
    if ms:
        time.sleep(ms / 1000)
    return value + 1


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fill(app: Any, finished: int, running: int, tasks: int, template: dict[str, Any]) -> None:
    """Index ``finished`` + ``running`` jobs as send, workers and fan-in do; ``tasks`` tasks' counters."""
    from workers import jobindex, keys, metrics
    from workers.settings import get_settings

    client = app.backend.client
    expires = get_settings().result_expires
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        for i in range(finished + running):
            job_id, sent_at = f"bench-{i:06d}", now - (finished + running - i)
            record = {**template, "job_id": job_id, "group_id": f"g-{job_id}", "sent_at": sent_at}
            pipe.set(keys.job(job_id), json.dumps(record), ex=expires)
            jobindex.index_job(pipe, job_id, sent_at, expires)
            if i < finished:
                state = jobindex.ENDED[i % 3]
                end = {
                    "state": state,
                    "succeeded": 90,
                    "failed": 10,
                    "cancelled": 0,
                    "finished_at": sent_at + 1,
                }
                pipe.set(keys.job_end(job_id), json.dumps(end), ex=expires)
                pipe.zadd(keys.jobs_ended(state), {job_id: sent_at})
            else:
                counts = metrics.BatchCounts(succeeded=500, failed=3, exceptions={"KeyError": 3})
                metrics.count_batch(pipe, "bench.observe.work", f"g-{job_id}", counts, 0.3, expires)
            if i % 1000 == 999:
                pipe.execute()
        for t in range(tasks):
            counts = metrics.BatchCounts(
                succeeded=1000, failed=5, exceptions={"KeyError": 3, "ValueError": 2}
            )
            for seconds in (0.01, 0.3, 2.0, 40.0):
                metrics.count_batch(pipe, f"bench.task{t}", None, counts, seconds, expires)
        pipe.execute()


def timed_command(*args: str) -> tuple[float, int]:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"bench: fanout {' '.join(args)} exited {done.returncode}: {done.stderr.decode()}")
    return time.perf_counter() - began, len(done.stdout)


def scrape(url: str) -> tuple[float, int]:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - began, len(body)


class Exporter:
    """``fanout exporter`` as a process on a free port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "orchestrator",
                    "exporter",
                    "--port",
                    str(self.port),
                    "--address",
                    "127.0.0.1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(self.url)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"bench: the exporter did not start: {log.read_text()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def beside_a_job(
    app: Any, items: int, item_ms: float, batch: int, every: float, out: Path
) -> dict[str, float]:
    """One job's items/s, with the exporter scraped every ``every`` seconds (``every`` > 0) or without it."""
    import threading

    exporter = Exporter(out / "exporter-job.log") if every > 0 else None
    stop = threading.Event()
    scrapes = [0]

    def keep_scraping() -> None:
        assert exporter is not None
        while not stop.wait(every):
            scrape(exporter.url)
            scrapes[0] += 1

    thread = threading.Thread(target=keep_scraping, daemon=True) if exporter else None
    if thread:
        thread.start()
    try:
        began = time.perf_counter()
        outcome = fanout.map(work, range(items), kwargs={"ms": item_ms}, batch_size=batch, timeout=600)
        wall = time.perf_counter() - began
    finally:
        stop.set()
        if thread:
            thread.join(30)
        if exporter:
            exporter.stop()
    assert outcome.succeeded == items, outcome
    return {"items_per_s": items / wall, "wall_s": wall, "scrapes": scrapes[0]}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--finished", type=click.IntRange(min=0), default=10_000, show_default=True, help="Finished jobs indexed."
)
@click.option(
    "--running", type=click.IntRange(min=0), default=100, show_default=True, help="Running jobs indexed."
)
@click.option(
    "--tasks", type=click.IntRange(min=0), default=20, show_default=True, help="Tasks with counters."
)
@click.option("--scrapes", type=click.IntRange(min=1), default=20, show_default=True, help="Scrapes timed.")
@click.option(
    "--items", type=click.IntRange(min=1), default=20_000, show_default=True, help="Items of the job."
)
@click.option("--item-ms", type=float, default=0.0, show_default=True, help="Milliseconds an item sleeps.")
@click.option("--batch", type=click.IntRange(min=1), default=20, show_default=True, help="Items a batch.")
@click.option(
    "--every", type=float, default=1.0, show_default=True, help="Seconds between scrapes beside the job."
)
@click.option(
    "--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved pairs of runs."
)
@out_option("Where observe.json goes.")
def main(
    finished: int,
    running: int,
    tasks: int,
    scrapes: int,
    items: int,
    item_ms: float,
    batch: int,
    every: float,
    runs: int,
    out: Path,
) -> None:
    """Measure the exporter and ``fanout jobs`` (see the module's docstring)."""
    from orchestrator.discovery import list_workers
    from orchestrator.local import LocalWorker
    from workers import keys
    from workers.app import app

    if list_workers(app):
        raise SystemExit("bench: workers already listen on this Redis database; use another FANOUT_REDIS_URL")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FANOUT_IMPORTS": "bench.observe", "PYTHONPATH": os.getcwd()}
    worker = LocalWorker(
        app, 2, "bench-observe", env, str(out / "worker-observe.log"), ["--loglevel", "WARNING"]
    )
    report: dict[str, Any] = {"finished": finished, "running": running, "tasks": tasks}
    app.backend.client.flushdb()
    with worker:
        pairs: list[tuple[dict[str, float], dict[str, float]]] = []
        for _ in range(runs):  # interleaved: without, with
            pairs.append(
                (
                    beside_a_job(app, items, item_ms, batch, 0.0, out),
                    beside_a_job(app, items, item_ms, batch, every, out),
                )
            )
        template_id = fanout.submit(work, range(10)).id
        fanout.Job.attach(template_id).wait(60)
        template = json.loads(app.backend.client.get(keys.job(template_id)))
        fill(app, finished, running, tasks, template)
        exporter = Exporter(out / "exporter-scrape.log")
        try:
            timed = [scrape(exporter.url) for _ in range(scrapes)]
        finally:
            exporter.stop()
        from orchestrator.joblist import list_jobs
        from workers.settings import get_settings

        expires = get_settings().result_expires
        list_ms = []
        for limit in (20, None):
            began = time.perf_counter()
            listed = list_jobs(app, expires, limit)
            list_ms.append((time.perf_counter() - began) * 1000)
            assert len(listed) >= (running if limit else finished + running), len(listed)
        report["list_ms"] = list_ms
        listing = [timed_command("jobs") for _ in range(3)]
        listing_all = [timed_command("jobs", "--all", "--json") for _ in range(3)]
        app.backend.client.flushdb()
    without = statistics.median(a["items_per_s"] for a, _ in pairs)
    with_exporter = statistics.median(b["items_per_s"] for _, b in pairs)
    walls = [t for t, _ in timed]
    report |= {
        "scrape_median_s": statistics.median(walls),
        "scrape_max_s": max(walls),
        "scrape_bytes": timed[0][1],
        "jobs_command_median_s": statistics.median(t for t, _ in listing),
        "jobs_all_json_command_median_s": statistics.median(t for t, _ in listing_all),
        "job": {"items": items, "item_ms": item_ms, "batch": batch, "every_s": every},
        "runs": [{"without": a, "with": b} for a, b in pairs],
        "items_per_s_without": without,
        "items_per_s_with": with_exporter,
        "ratio_with_over_without": with_exporter / without,
    }
    (out / "observe.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| measure | figure |")
    print("| --- | ---: |")
    scraped = f"{report['scrape_median_s'] * 1000:.1f} ms ({report['scrape_max_s'] * 1000:.1f} ms)"
    print(
        f"| scrape, {running} running + {finished:,} finished jobs, {tasks} tasks: median (max) | {scraped} |"
    )
    print(f"| `list_jobs`: newest 20 + running / all, in-process | {report['list_ms'][0]:.1f} ms / "
          f"{report['list_ms'][1]:.0f} ms |")  # fmt: skip
    print(f"| `fanout jobs` (newest 20 + running), whole command | {report['jobs_command_median_s']:.2f} s |")
    print(f"| `fanout jobs --all --json` ({finished + running:,} rows), whole command | "
          f"{report['jobs_all_json_command_median_s']:.2f} s |")  # fmt: skip
    print(f"| job of {items:,} items, items/s without / with the exporter (scraped every {every:g} s) | "
          f"{without:,.0f} / {with_exporter:,.0f} = {with_exporter / without:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
