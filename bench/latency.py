"""``python -m bench.latency``: whole commands with the worker behind a link of 2 ms round-trip time.

A worker on another machine pays the network's round-trip time on every Redis
command it waits for.  This bench puts one real worker (2 processes) behind
:class:`bench.delayproxy.DelayProxy`, a TCP proxy that delays each direction by
half the round-trip time (this kernel has no netem), while the client stays next
to Redis: each command is ``python -m orchestrator ...`` as a user runs it, a
fresh process with the direct FANOUT_REDIS_URL, timed from start to exit.

Rows (each at 0 ms and at ``--rtt-ms``, alternating, median of ``--runs``):

* ``double --range N --batch-size 1``: one task per item;
* ``double --range N`` (auto batch, by reference from 200,000 items);
* ``resize`` of generated 1920x1080 photos, ``--no-contact-sheet --max-side 256``.

At 0 ms the same proxy passes bytes straight through, so its own cost is on both
sides of the ratio (0 ms time / slow time, as throughput).  The one-way delay is
calibrated first so that PING through the proxy takes ``--rtt-ms`` longer than at 0.
``--direct`` (on by default) runs the rows once more with the worker straight on
Redis, to show what the proxy itself costs.

The proxy also counts the worker's Redis commands by name and its round trips
(turnarounds: a request sent after a reply on the same connection), per task of
the job (its batches, plus the fan-in): where the round trips go.  Each outcome is
checked (exit 0, every item succeeded, results in order, every output written)
before a figure counts.  Writes ``latency.json`` under ``--out`` and prints markdown.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from bench import out_option
from bench.delayproxy import DelayProxy, Traffic
from bench.suite import fanout_cli


def _proxied_url(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's (loopback), credentials kept."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(auth + "@" if auth else "") + f"127.0.0.1:{port}"))


def ping_ms(port: int, db: int, count: int = 200) -> float:
    """Median PING round trip through the proxy, in ms."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, db=db)
    try:
        client.ping()
        times = []
        for _ in range(count):
            began = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1e3
    finally:
        client.close()


def calibrate(proxy: DelayProxy, db: int, rtt_ms: float) -> dict[str, float]:
    """Set the one-way delay so PING takes ``rtt_ms`` longer than through the proxy at 0."""
    proxy.delay = 0.0
    base = ping_ms(proxy.port, db)
    delay = rtt_ms / 2e3
    for attempt in range(4):  # threads wake a little late: take that off the delay
        proxy.delay = delay
        added = ping_ms(proxy.port, db) - base
        if abs(added - rtt_ms) < 0.05 or attempt == 3 or rtt_ms == 0:
            break
        delay = max(0.0, delay - (added - rtt_ms) / 2e3)
    proxy.delay = 0.0
    return {"ping_0_ms": base, "one_way_delay_ms": delay * 1e3, "added_rtt_ms": added}


def _check_doubled(doc: dict[str, Any], n: int) -> None:
    if doc["failed"] or doc["succeeded"] != n or doc["results"] != [2 * i for i in range(n)]:
        raise SystemExit(f"bench: doubling {n} items came back incomplete or out of order")


def _check_resized(doc: dict[str, Any], n: int, out: Path) -> None:
    written = [p for p in out.rglob("*.jpg")]
    if doc["failed"] or doc["succeeded"] != n or len(written) != n:
        counts = f"{doc['succeeded']} of {n} succeeded, {doc['failed']} failed, {len(written)} written"
        raise SystemExit(f"bench: resize: {counts}")


def run_case(
    proxy: DelayProxy | None, env: dict[str, str], case: dict[str, Any], delay: float, timeout: float
) -> dict[str, Any]:
    """Run one row's command once with the proxy at ``delay``; check it; return its figures and traffic.

    With no proxy (the worker straight on Redis) there is no traffic to count.
    """
    from orchestrator.jobs import Job
    from workers.app import app

    out: Path | None = case.get("dest")
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    args = [*case["args"], *(["--out", str(out)] if out is not None else [])]
    if proxy is not None:
        proxy.delay = delay
        proxy.take()
    doc, wall, _ = fanout_cli(env, args, timeout)
    traffic = proxy.take() if proxy is not None else Traffic()
    if out is None:
        _check_doubled(doc, case["n"])
    else:
        _check_resized(doc, case["n"], out)
        shutil.rmtree(out, ignore_errors=True)
    batches = Job.attach(doc["job_id"], app).batches
    return {
        "wall_s": round(wall, 3),
        "elapsed_s": doc["elapsed_s"],
        "batches": batches,
        "round_trips": traffic.round_trips,
        "commands": dict(traffic.commands),
        "connections": traffic.connections,
        "bytes_up": traffic.bytes_up,
        "bytes_down": traffic.bytes_down,
    }


def script_names() -> dict[str, str]:
    """``EVALSHA 1a2b3c4d`` -> ``EVALSHA CHORD_PART_RETURN_LUA``: the Lua scripts the worker may run."""
    import hashlib
    import importlib

    names = {}
    for module in ("celery.backends.redis", "workers.control", "workers.healing", "workers.purge"):
        for name, value in vars(importlib.import_module(module)).items():
            if name.endswith("_LUA") and isinstance(value, str):
                sha = hashlib.sha1(value.encode()).hexdigest()[:8]
                names[f"EVALSHA {sha}"] = names[f"EVAL {sha}"] = f"EVAL(SHA) {name}"
    return names


def per_task(found: list[dict[str, Any]]) -> dict[str, float]:
    """Commands by name and round trips per task (batches + the fan-in), over all runs."""
    tasks = sum(row["batches"] + 1 for row in found)
    scripts = script_names()
    total: Counter[str] = Counter()
    for row in found:
        total.update({scripts.get(name, name): count for name, count in row["commands"].items()})
    doc = {name: count / tasks for name, count in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))}
    doc["all commands"] = sum(total.values()) / tasks
    doc["round trips"] = sum(row["round_trips"] for row in found) / tasks
    return doc


_COUNT = click.IntRange(min=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", type=_COUNT, default=3, show_default=True, help="Runs per row and delay.")
@click.option("--rtt-ms", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Slow RTT, ms.")
@click.option("--per-item", type=_COUNT, default=3000, show_default=True, help="Items, one a task.")
@click.option("--batched", type=_COUNT, default=1_000_000, show_default=True, help="Items, auto batch.")
@click.option("--photos", type=_COUNT, default=300, show_default=True, help="Photos to resize.")
@click.option("--timeout", type=_COUNT, default=600, show_default=True, help="Per command, s.")
@click.option("--direct/--no-direct", default=True, show_default=True, help="Also run with no proxy.")
@out_option("Where latency.json, the worker's log and the generated photos go.")
def main(
    runs: int, rtt_ms: float, per_item: int, batched: int, photos: int, timeout: int, direct: bool, out: Path
) -> None:
    """Whole commands with the worker behind a delaying proxy, 0 ms against --rtt-ms (see the module)."""
    from orchestrator.discovery import list_workers
    from orchestrator.local import LocalWorker
    from orchestrator.samples import make_photos
    from workers.app import app
    from workers.settings import Settings

    if list_workers(app):
        raise SystemExit("bench: workers already listen on this Redis database; use another FANOUT_REDIS_URL")
    settings = Settings.from_env()
    redis_url = settings.broker_url
    if settings.result_backend != redis_url or not redis_url.startswith("redis://"):
        raise SystemExit("bench: needs one plain redis:// FANOUT_REDIS_URL for broker and results")
    target = urlsplit(redis_url)
    db = int(target.path.strip("/") or 0)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = out / f"latency-photos-{photos}"
    if len(list(source.glob("*.jpg"))) != photos:
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        make_photos(source, photos)
    cases: list[dict[str, Any]] = [
        {"name": f"`fanout double --range {per_item} --batch-size 1`", "n": per_item,
         "args": ["double", "--range", str(per_item), "--batch-size", "1"]},
        {"name": f"`fanout double --range {batched}`", "n": batched,
         "args": ["double", "--range", str(batched)]},
        {"name": f"`fanout resize` {photos} photos `--no-contact-sheet --max-side 256`", "n": photos,
         "args": ["resize", str(source), "--no-contact-sheet", "--max-side", "256"],
         "dest": out / "latency-out"},
    ]  # fmt: skip
    client_env = {**os.environ, "PYTHONPATH": os.getcwd()}
    Rows = dict[str, dict[str, list[dict[str, Any]]]]
    rows: Rows = {case["name"]: {"0": [], "slow": [], "direct": []} for case in cases}
    with DelayProxy((target.hostname or "127.0.0.1", target.port or 6379)) as proxy:
        link = calibrate(proxy, db, rtt_ms)
        split = ("FANOUT_BROKER_URL", "FANOUT_RESULT_BACKEND")
        worker_env = {k: v for k, v in client_env.items() if k not in split}
        worker_env["FANOUT_REDIS_URL"] = _proxied_url(redis_url, proxy.port)
        worker = LocalWorker(app, 2, "bench-latency", worker_env, str(out / "worker-latency.log"))
        with worker:
            warm_up = {"n": 100, "args": ["double", "--range", "100"]}
            run_case(proxy, client_env, warm_up, 0.0, timeout)
            time.sleep(1.0)
            proxy.take()
            time.sleep(3.0)  # the worker's own traffic while idle (BRPOP timeouts, heartbeats)
            idle = proxy.take()
            for run in range(runs):
                for case in cases:
                    order = [("0", 0.0), ("slow", link["one_way_delay_ms"] / 1e3)]
                    for key, delay in order if run % 2 == 0 else order[::-1]:
                        rows[case["name"]][key].append(run_case(proxy, client_env, case, delay, timeout))
    if direct:  # the same rows with the worker straight on Redis: what the proxy itself costs
        with LocalWorker(app, 2, "bench-latency-direct", client_env, str(out / "worker-latency.log")):
            run_case(None, client_env, warm_up, 0.0, timeout)
            for _ in range(runs):
                for case in cases:
                    rows[case["name"]]["direct"].append(run_case(None, client_env, case, 0.0, timeout))
    document = {
        "runs": runs,
        "rtt_ms": rtt_ms,
        "link": link,
        "idle_per_s": {"commands": dict(idle.commands), "round_trips": idle.round_trips / 3.0},
        "cases": {
            name: {
                **found,
                "ratio": statistics.median(r["wall_s"] for r in found["0"])
                / statistics.median(r["wall_s"] for r in found["slow"]),
                "per_task_0": per_task(found["0"]),
                "per_task_slow": per_task(found["slow"]),
            }
            for name, found in rows.items()
        },
    }
    (out / "latency.json").write_text(json.dumps(document, indent=2) + "\n")
    print_tables(document)


_TOTALS = ("all commands", "round trips")


def print_tables(document: dict[str, Any]) -> None:
    link = document["link"]
    rtt = document["rtt_ms"]
    print(
        f"Link: PING {link['ping_0_ms']:.2f} ms through the proxy at 0; {link['added_rtt_ms']:.2f} ms more "
        f"at {link['one_way_delay_ms']:.2f} ms each way. "
        f"Median of {document['runs']} (min-max), whole commands.\n"
    )
    print(
        f"| command | tasks | no proxy, s | 0 ms, s | {rtt:g} ms, s | ratio (throughput) "
        f"| round trips / task, 0 ms | {rtt:g} ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, case in document["cases"].items():
        zero = [r["wall_s"] for r in case["0"]]
        bare = [r["wall_s"] for r in case["direct"]]
        no_proxy = f"{statistics.median(bare):.2f} ({min(bare):.2f}-{max(bare):.2f})" if bare else ""
        slow = [r["wall_s"] for r in case["slow"]]
        print(
            f"| {name} | {case['0'][0]['batches'] + 1:,} | {no_proxy} "
            f"| {statistics.median(zero):.2f} ({min(zero):.2f}-{max(zero):.2f}) "
            f"| {statistics.median(slow):.2f} ({min(slow):.2f}-{max(slow):.2f}) | {case['ratio']:.2f}x "
            f"| {case['per_task_0']['round trips']:.1f} | {case['per_task_slow']['round trips']:.1f} |"
        )
    names = list(document["cases"])
    commands: list[str] = []
    for name in names:
        commands += [c for c in document["cases"][name]["per_task_0"] if c not in commands]
    commands = [c for c in commands if c not in _TOTALS] + list(_TOTALS)
    print("\nThe worker's Redis commands per task (batches + the fan-in), at 0 ms:\n")
    print("| command | " + " | ".join(f"({chr(97 + i)})" for i in range(len(names))) + " |")
    print("| --- |" + " ---: |" * len(names))
    for command in commands:
        cells = [document["cases"][name]["per_task_0"].get(command, 0.0) for name in names]
        if max(cells) >= 0.01:
            print(f"| {command} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print("\n" + "; ".join(f"({chr(97 + i)}) {name}" for i, name in enumerate(names)))


if __name__ == "__main__":
    main()
