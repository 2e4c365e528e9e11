"""``python -m bench.stream``: N cheap items through ``fanout map --input -``, the whole command.

The item is a short string, the work a hash of it (:func:`digest`: blake2b, 8 bytes,
about a microsecond): the cost of fanout itself, not of the work.  For each N, on a
Redis of its own and a fresh worker (``-c 2``, with this module on FANOUT_IMPORTS), as
``bench.memory`` does:

* the wall time of ``fanout map bench.stream:digest --input - < N lines``, its stdout
  going to a file, and items/s over it; when its first batch reached Redis (start-up and
  the first pass) and its summary's time (to the fan-in: the rest is writing the output);
* the client's peak RSS (``wait4``), the worker's (all processes, sampled) and Redis's
  peak growth;
* the batches the job was sent in (``keys.starts``): how many, the first sizes, the largest;
* the output checked (N lines, in order; a few results recomputed).

``--profile FILE`` runs the client under cProfile and prints the top of it: where the
client's time goes.  ``--target-s`` tries other batch times (orchestrator/stream.py's
TARGET_S), interleaved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

import fanout
from bench.memory import MB, OwnRedis, Sampler, _env, _job_seconds, _python, _start_worker, _stop_worker


@fanout.task
def digest(item: str) -> str:
    """A cheap item: the 8-byte blake2b of ``item``, in hex."""
    return hashlib.blake2b(item.encode(), digest_size=8).hexdigest()


@dataclass
class Row:
    n: int
    target_s: float
    wall_s: float
    items_per_s: float
    #: From the start of the send (the first pass included) to the fan-in, as the command's
    #: summary line says; the rest of the wall time is start-up and writing the N lines.
    job_s: float
    #: From the command's start to its first batch in Redis: start-up and the first pass.
    first_batch_s: float
    client_peak_mb: float
    worker_peak_mb: float
    redis_growth_mb: float
    batches: int
    first_sizes: list[int]
    largest_batch: int
    ok: bool
    load_1m: float


def write_input(path: Path, n: int) -> None:
    """N lines, ``"k<i>"`` each."""
    with path.open("w") as fh:
        step = 100_000
        for low in range(0, n, step):
            fh.write("".join(f'"k{i}"\n' for i in range(low, min(n, low + step))))


def check_output(path: Path, n: int) -> bool:
    """N lines, indexes 0..N-1 in order; every 100,000th result recomputed."""
    count = 0
    with path.open("rb") as fh:
        for count, line in enumerate(fh, 1):
            if (count - 1) % 100_000 == 0:
                row = json.loads(line)
                if row != {"index": count - 1, "result": digest(f"k{count - 1}")}:
                    return False
    return count == n


def _batches(client: Any) -> tuple[int, list[int], int]:
    """(batches, the first ten sizes, the largest) of the one job in this Redis."""
    names = [k for k in client.keys("fanout:starts:*")]
    if not names:
        return 0, [], 0
    raw = client.get(names[0]) or b""
    starts = [int.from_bytes(raw[i : i + 8], "big") for i in range(0, len(raw), 8)]
    record = json.loads(client.get(b"fanout:job:" + names[0].split(b":")[-1]) or b"{}")
    sizes = [b - a for a, b in zip(starts, [*starts[1:], int(record.get("total", starts[-1]))], strict=True)]
    return len(starts), sizes[:10], max(sizes)


def _watch_first_batch(client: Any, started: float, found: list[float], timeout: float = 3600) -> None:
    """Note when the job's first batch is in Redis (its starts key), seconds after ``started``."""
    while time.perf_counter() - started < timeout:
        if client.keys("fanout:starts:*"):
            found.append(time.perf_counter() - started)
            return
        time.sleep(0.05)


def measure(
    n: int, work: Path, timeout: float, report: Any, profile: Path | None, target_s: float | None = None
) -> Row:
    code = Path.cwd()
    work.mkdir(parents=True, exist_ok=True)
    source = work / "input.jsonl"
    write_input(source, n)
    results = work / "results"
    own = OwnRedis(work / "redis")
    with own as client:
        env = {**_env(code, own.url, results), "FANOUT_IMPORTS": "bench.stream"}
        worker = _start_worker(code, env, client, work / "worker.log")
        try:
            time.sleep(1.0)
            baseline = int(client.info("memory")["used_memory"])
            sampler = Sampler(client, worker.pid)
            sampler.redis_peak = baseline
            sampler.start()
            out = work / "stdout"
            command = [_python(code), "-m", "orchestrator", "map", "bench.stream:digest", "--input", "-",
                       "--no-progress", "--timeout", str(timeout)]  # fmt: skip
            if profile is not None:
                command[1:3] = ["-m", "cProfile", "-o", str(profile), "-m", "orchestrator"]
            if target_s is not None:  # another batch time than orchestrator.stream.TARGET_S
                command[1:3] = ["-c", f"import orchestrator.stream as s; s.TARGET_S = {target_s}; "
                                "from orchestrator.cli import main; main()"]  # fmt: skip
            started = time.perf_counter()
            first_batch: list[float] = []
            watch = threading.Thread(
                target=_watch_first_batch, args=(client, started, first_batch), daemon=True
            )
            watch.start()
            with source.open("rb") as stdin, out.open("wb") as fh, (work / "client.err").open("wb") as err:
                proc = subprocess.Popen(command, cwd=code, env=env, stdin=stdin, stdout=fh, stderr=err)
                _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            load = os.getloadavg()[0]
            sampler.stop.set()
            sampler.join()
            code_ = os.waitstatus_to_exitcode(status)
            ok = code_ == 0 and check_output(out, n)
            if not ok:
                report(f"N={n}: exit {code_}; see {work}/client.err")
            batches, first, largest = _batches(client)
            from orchestrator.stream import TARGET_S

            row = Row(
                n=n,
                target_s=target_s or TARGET_S,
                wall_s=round(wall, 2),
                items_per_s=round(n / wall),
                job_s=_job_seconds((work / "client.err").read_text(errors="replace")),
                first_batch_s=round(first_batch[0], 2) if first_batch else 0.0,
                client_peak_mb=round(usage.ru_maxrss / 1024, 1),
                worker_peak_mb=round(sampler.worker_peak_kb / 1024, 1),
                redis_growth_mb=round((sampler.redis_peak - baseline) / MB, 1),
                batches=batches,
                first_sizes=first,
                largest_batch=largest,
                ok=ok,
                load_1m=round(load, 2),
            )
        finally:
            _stop_worker(worker)
    shutil.rmtree(work, ignore_errors=True)
    return row


@click.command()
@click.option("--n", "ns", default="1000000,20000000", show_default=True, help="Comma-separated item counts.")
@click.option("--timeout", type=float, default=1800.0, show_default=True)
@click.option("--profile", type=click.Path(path_type=Path), help="Profile the client (cProfile) into FILE.")
@click.option(
    "--target-s",
    "targets",
    default="",
    help="Comma-separated batch times to try in turn, interleaved (default: TARGET_S alone).",
)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Runs of each N.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("docs"), show_default=True)
def main(ns: str, timeout: float, profile: Path | None, targets: str, repeat: int, out: Path) -> None:
    """N cheap items through `fanout map --input -`: wall time, items/s, memory, batch sizes."""

    def report(line: str) -> None:
        click.echo(f"bench.stream: {line}", err=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="fanout-streambench-") as tmp:
        tried: list[float | None] = [float(t) for t in targets.split(",") if t.strip()] or [None]
        for n in (int(part.replace("_", "")) for part in ns.split(",") if part.strip()):
            for _ in range(repeat):
                for target in tried:  # interleaved: A, B, A, B on a machine whose load moves
                    report(f"N={n:,}, target {target or 'default'}")
                    row = measure(n, Path(tmp) / str(n), timeout, report, profile, target)
                    report(json.dumps(asdict(row)))
                    rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-stream.json").write_text(
        json.dumps({"cpus": os.cpu_count(), "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    if profile is not None:
        import pstats

        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(30)
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
