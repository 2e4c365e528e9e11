"""The benchmarks: each target and its reference, measured in the same run.

Every benchmark starts its own ``celery worker`` processes (LocalWorker),
generates its own input (nothing is downloaded) and checks that the results
are complete and in input order before a figure counts.

Images are measured as a user waits for them: the wall time of a whole
command, each a fresh process (``fanout resize``; the reference scripts of
:mod:`bench.reference`: a process pool running fanout's own resize function,
one running Pillow's ``thumbnail``, and Dask).  Doubling rates are items per
second over the CLI's own ``elapsed_s`` (from sending the header to the
fan-in), and Dask's over its map with the cluster already up, so start-up is
left out on both sides there; wall times are recorded beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

Rates = list[float]


@dataclass
class Figure:
    """One benchmark: our rates and the reference's, each over several runs."""

    name: str
    n: int
    unit: str
    rates: Rates
    reference: str = ""
    reference_rates: Rates = field(default_factory=list)
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    dask_rates: Rates = field(default_factory=list)

    @property
    def dask_median(self) -> float:
        return statistics.median(self.dask_rates) if self.dask_rates else 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def reference_median(self) -> float:
        return statistics.median(self.reference_rates) if self.reference_rates else 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["median"] = self.median
        doc["reference_median"] = self.reference_median
        doc["ratio"] = self.median / self.reference_median if self.reference_median else None
        doc["dask_median"] = self.dask_median
        doc["dask_ratio"] = self.median / self.dask_median if self.dask_median else None
        return doc


@dataclass(frozen=True)
class Config:
    workers: int
    concurrency: int
    runs: int
    photos: tuple[int, ...]
    noisy_photos: tuple[int, ...]
    per_item_ns: tuple[int, ...]
    dask_ns: tuple[int, ...]
    fanin_ns: tuple[int, ...]
    batched_ns: tuple[int, ...]
    publish_n: int
    tutorial_n: int
    loglevel: str
    timeout: float
    work_dir: Path

    @property
    def processes(self) -> int:
        return self.workers * self.concurrency


def spread(rates: Sequence[float]) -> str:
    if not rates:
        return "-"
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


# --------------------------------------------------------------------------- workers


@contextmanager
def local_workers(app: Celery, config: Config) -> Iterator[None]:
    """``config.workers`` worker processes of ``config.concurrency`` each, for the block's duration."""
    from orchestrator.discovery import list_workers
    from orchestrator.local import LocalWorker

    found = list_workers(app)
    if found:
        names = ", ".join(w.name for w in found)
        raise SystemExit(
            f"bench: workers already listen on this Redis database ({names}); they would skew the "
            "figures. Stop them or point FANOUT_REDIS_URL at another database."
        )
    started: list[LocalWorker] = []
    try:
        for i in range(config.workers):
            log = config.work_dir / f"worker-{i}.log"
            worker = LocalWorker(
                app,
                concurrency=config.concurrency,
                name=f"bench-{i}-{os.getpid()}",
                log_path=str(log),
                extra_args=["--loglevel", config.loglevel],
            )
            started.append(worker.start(timeout=60))
        yield
    finally:
        for worker in started:
            worker.stop()


#: Runs the command given in its arguments and reports that command's peak RSS (KiB) as
#: the last line of stderr.  A child forked straight from the benchmark would report the
#: benchmark's own size instead: Linux keeps the peak across fork and exec.
_PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def timed(env: dict[str, str], command: Sequence[str], timeout: float) -> tuple[bytes, float, int]:
    """Run ``command`` as a fresh process; return its stdout, wall seconds and peak RSS in KiB.

    stdout goes to a file: a million results is a large document.
    """
    wrapped = [sys.executable, "-c", _PEAK_RSS, *command]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        try:
            code = subprocess.run(wrapped, env=env, stdout=out, stderr=err, timeout=timeout + 60).returncode
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench: {' '.join(command)} did not finish in {timeout + 60:g} s") from None
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        if code != 0:
            raise SystemExit(f"bench: {' '.join(command)} exited {code}: " + "\n".join(lines[-20:]))
        return out.read(), wall, int(lines[-1])


def fanout_cli(env: dict[str, str], args: Sequence[str], timeout: float) -> tuple[dict[str, Any], float, int]:
    """Run ``fanout ARGS --json``; return its document, wall seconds and peak RSS in KiB."""
    command = [
        sys.executable, "-m", "orchestrator", *args, "--json", "--no-progress", "--timeout", str(timeout),
    ]  # fmt: skip
    out, wall, rss = timed(env, command, timeout)
    return json.loads(out), wall, rss


def reference(env: dict[str, str], args: Sequence[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run ``python -m bench.reference ARGS``; return its JSON line and wall seconds."""
    out, wall, _ = timed(env, [sys.executable, "-m", "bench.reference", *args], timeout)
    return json.loads(out.decode().strip().splitlines()[-1]), wall


def has_dask() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- doubling


def _check_doubled(doc: dict[str, Any], n: int) -> None:
    if doc["failed"] or doc["results"] != [2 * i for i in range(n)]:
        raise SystemExit(f"bench: doubling {n} items came back incomplete or out of order")


def bench_double(env: dict[str, str], config: Config, n: int, batch: str) -> tuple[Rates, dict[str, Any]]:
    rates: Rates = []
    walls: list[float] = []
    rss: list[int] = []
    for _ in range(config.runs):
        doc, wall, peak = fanout_cli(
            env, ["double", "--range", str(n), "--batch-size", batch], config.timeout
        )
        _check_doubled(doc, n)
        rates.append(n / doc["elapsed_s"])
        walls.append(round(wall, 3))
        rss.append(peak)
    return rates, {"wall_s": walls, "client_peak_rss_kib": rss}


def dask_double(env: dict[str, str], config: Config, n: int) -> tuple[Rates, dict[str, Any]]:
    """One Dask task per number on a LocalCluster of single-threaded processes: rates over the map."""
    rates: Rates = []
    extra: dict[str, list[float]] = {"dask_wall_s": [], "dask_start_s": []}
    for _ in range(config.runs):
        doc, wall = reference(
            env, ["dask-double", str(n), "--processes", str(config.processes)], config.timeout
        )
        rates.append(n / doc["job_s"])
        extra["dask_wall_s"].append(round(wall, 3))
        extra["dask_start_s"].append(doc["start_s"])
    return rates, extra


def tutorial_group(app: Celery, n: int, timeout: float) -> float:
    """The tutorial pattern: one stored-result task per number, ``group(...).get()``.

    The client subscribes to every task's result: the reference for per-item fan-out.
    """
    from celery import group

    from workers.tasks import double

    started = time.perf_counter()
    result = group(double.s(i) for i in range(n)).apply_async()
    values = result.get(timeout=timeout)
    elapsed = time.perf_counter() - started
    result.forget()
    if values != [2 * i for i in range(n)]:
        raise SystemExit("bench: the tutorial group came back incomplete")
    return n / elapsed


def celery_chunks(app: Celery, n: int, size: int, timeout: float) -> float:
    """Celery's own batching: ``double.chunks(..., size)``, results gathered with ``.get()``."""
    from workers.tasks import double

    started = time.perf_counter()
    result = double.chunks(((i,) for i in range(n)), size).group().apply_async()
    chunks = result.get(timeout=timeout)
    elapsed = time.perf_counter() - started
    result.forget()
    if [v for chunk in chunks for v in chunk] != [2 * i for i in range(n)]:
        raise SystemExit("bench: Celery chunks came back incomplete")
    return n / elapsed


# --------------------------------------------------------------------------- publishing


def bench_publish(app: Celery, config: Config) -> Figure:
    """Header messages onto the broker per second, with no worker consuming them."""
    import redis as redis_lib

    from orchestrator import builtin
    from orchestrator.canvas import build
    from orchestrator.publish import publish_chord

    client = redis_lib.Redis.from_url(app.conf.broker_url)
    n = config.publish_n
    ours: Rates = []
    theirs: Rates = []
    try:
        for _ in range(config.runs):
            chord = build(builtin.double(list(range(n))), 1)
            started = time.perf_counter()
            publish_chord(app, chord)
            ours.append(n / (time.perf_counter() - started))
            _drain(client, app.conf.task_default_queue)
            chord = build(builtin.double(list(range(n))), 1)
            started = time.perf_counter()
            result = chord.apply_async()
            theirs.append(n / (time.perf_counter() - started))
            for child in result.parent.results:
                app.backend.result_consumer.cancel_for(child.id)
            _drain(client, app.conf.task_default_queue)
    finally:
        _drain(client, app.conf.task_default_queue)
        client.close()
    return Figure(
        "publish header (batch 1)",
        n,
        "msg/s",
        ours,
        "chord.apply_async",
        theirs,
        ">= 5,000 msg/s",
    )


def _drain(client: Any, queue: str) -> None:
    """Drop the benchmark's unconsumed messages and chord counters (this database only)."""
    client.delete(queue)
    for key in client.scan_iter("celery-taskset-meta-*", count=1000):
        client.delete(key)


# --------------------------------------------------------------------------- images


def photos(config: Config, n: int, noisy: bool = False) -> Path:
    from orchestrator.samples import make_photos

    directory = config.work_dir / (f"photos-{n}-noisy" if noisy else f"photos-{n}")
    if len(list(directory.glob("*.jpg"))) != n:
        make_photos(directory, n, noisy=noisy)
    return directory


def bench_images(
    env: dict[str, str], config: Config, n: int, dask: bool, noisy: bool = False
) -> list[Figure]:
    """``fanout resize`` against its references, every one a whole command in a fresh process.

    ``noisy``: photos with sensor-like noise, several times larger, where decoding dominates.
    """
    source = photos(config, n, noisy)
    kind = "noisy photos" if noisy else "photos"
    out = config.work_dir / "out"
    processes = ["--processes", str(config.processes)]
    walls: dict[str, list[float]] = {k: [] for k in ("fanout", "bare", "same", "thumbnail", "dask")}
    elapsed: list[float] = []
    dask_job: list[float] = []
    dask_start: list[float] = []

    def fresh(name: str) -> str:
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        return str(target)

    def resized(doc: dict[str, Any]) -> None:
        if doc["failed"] or doc["total"] != n:
            raise SystemExit(f"bench: resize failed for {doc['failed']} of {doc['total']} images")

    for _ in range(config.runs):
        doc, wall = reference(
            env, ["pool-thumbnail", str(source), fresh("thumbnail"), *processes], config.timeout
        )
        walls["thumbnail"].append(wall)
        doc, wall = reference(env, ["pool-resize", str(source), fresh("same"), *processes], config.timeout)
        walls["same"].append(wall)
        args = ["resize", str(source), "--max-side", "256"]
        doc, wall, _ = fanout_cli(env, [*args, "--out", fresh("fanout")], config.timeout)
        resized(doc)
        walls["fanout"].append(wall)
        elapsed.append(doc["elapsed_s"])
        doc, wall, _ = fanout_cli(env, [*args, "--out", fresh("bare"), "--no-contact-sheet"], config.timeout)
        resized(doc)
        walls["bare"].append(wall)
        if dask:
            doc, wall = reference(
                env, ["dask-resize", str(source), fresh("dask"), *processes], config.timeout
            )
            walls["dask"].append(wall)
            dask_job.append(doc["job_s"])
            dask_start.append(doc["start_s"])
    shutil.rmtree(out, ignore_errors=True)

    def rates(key: str) -> Rates:
        return [n / wall for wall in walls[key]]

    extra = {
        "wall_s": {k: [round(w, 3) for w in v] for k, v in walls.items()},
        "fanout_elapsed_s": elapsed,
        "dask_job_s": dask_job,
        "dask_start_s": dask_start,
    }
    pool = f"ProcessPoolExecutor({config.processes})"
    return [
        Figure(
            f"`fanout resize` {n} {kind} -> 256, manifest + sheet (whole command)",
            n,
            "img/s",
            rates("fanout"),
            f"{pool} + fanout's resize",
            rates("same"),
            ">= 0.9x",
            extra,
            rates("dask"),
        ),
        Figure(
            f"`fanout resize` {n} {kind} -> 256, manifest + sheet (whole command)",
            n,
            "img/s",
            rates("fanout"),
            f"{pool} + thumbnail",
            rates("thumbnail"),
            ">= 1.2x",
            {},
            rates("dask"),
        ),
        Figure(
            f"same ({kind}), --no-contact-sheet (whole command)",
            n,
            "img/s",
            rates("bare"),
            f"{pool} + fanout's resize",
            rates("same"),
            "the sheet's cost: the difference from the first row",
        ),
    ]


def bench_fanin(config: Config, n: int) -> Figure:
    """The resize callback's own work for ``n`` images: pasting their tiles into pages, the manifest.

    Run in this process on tiles made as the header tasks make them (from
    256 px noisy outputs, the worst case for PNG), so the figure is the
    callback alone, to hold against its soft time limit.
    """
    from PIL import Image

    from workers.contact_sheet import make_tile
    from workers.fanin import merge
    from workers.report import write_report
    from workers.sheets import tiles_dir, write_strip

    out = config.work_dir / "fanin"
    seconds: list[float] = []
    pages = 0
    for _ in range(config.runs):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        results = []
        tiles = tiles_dir(str(out), "bench")
        made: dict[int, Any] = {}
        for i in range(n):
            destination = str(out / f"{i}.jpg")
            made[i] = make_tile(Image.effect_noise((256, 144), 40 + i % 50).convert("RGB"))
            if len(made) == 8 or i == n - 1:  # a strip a batch of 8, as the header tasks write them
                write_strip(tiles, made, sorted(made))
                made = {}
            results.append(
                {"source": f"/in/{i}.jpg", "destination": destination, "box": [256, 256], "width": 256,
                 "height": 144, "format": "JPEG", "bytes": 10_000, "seconds": 0.01}
            )  # fmt: skip
        outcome = merge(
            [{"start": 0, "results": results, "errors": [], "transient": 0}], n, "bench", "resize"
        )
        started = time.perf_counter()
        written = write_report(str(out), outcome, 1, True, tiles)  # no page drawn early: the worst case
        seconds.append(time.perf_counter() - started)
        pages = len(written["contact_sheets"])
    shutil.rmtree(out, ignore_errors=True)
    return Figure(
        "resize fan-in: tiles pasted into pages + manifest",
        n,
        "img/s",
        [n / s for s in seconds],
        target="well within the callback's soft time limit (20 s) at 10,000",
        extra={"seconds": [round(s, 3) for s in seconds], "pages": pages},
    )


# --------------------------------------------------------------------------- the whole suite


def run_suite(config: Config, selected: Sequence[str], report: Callable[[str], None]) -> list[Figure]:
    from workers.app import app

    env = dict(os.environ)
    figures: list[Figure] = []
    config.work_dir.mkdir(parents=True, exist_ok=True)
    # The reference programs (python -m bench.reference) and Dask's worker processes import
    # bench and workers from this checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    dask = has_dask()
    if not dask:
        report("no Dask (pip install 'fanout[bench]'): the Dask column stays empty")
    if "fanin" in selected:
        for n in config.fanin_ns:
            report(f"fanin: the resize callback for {n} images x {config.runs} runs")
            figures.append(bench_fanin(config, n))
    if "publish" in selected:
        report(f"publish: {config.publish_n} header messages x {config.runs} runs, no worker consuming")
        figures.append(bench_publish(app, config))
    if not {"images", "per-item", "batched"} & set(selected):
        return figures
    with local_workers(app, config):
        if "images" in selected:
            for n in config.photos:
                report(f"images: {n} photos x {config.runs} runs, whole commands")
                figures.extend(bench_images(env, config, n, dask))
            for n in config.noisy_photos:
                report(f"images: {n} noisy photos x {config.runs} runs, whole commands")
                figures.extend(bench_images(env, config, n, dask, noisy=True))
        if "per-item" in selected:
            for n in config.per_item_ns:
                report(f"per-item: {n} tasks (batch 1) x {config.runs} runs")
                rates, extra = bench_double(env, config, n, "1")
                tutorial: Rates = []
                if n == config.tutorial_n:
                    tutorial = [tutorial_group(app, n, config.timeout) for _ in range(config.runs)]
                dask_rates: Rates = []
                if dask and n in config.dask_ns:
                    report(f"per-item: {n} Dask tasks x {config.runs} runs")
                    dask_rates, dask_extra = dask_double(env, config, n)
                    extra.update(dask_extra)
                figures.append(
                    Figure(
                        "double, one task per item",
                        n,
                        "items/s",
                        rates,
                        "tutorial group(...).get()" if tutorial else "",
                        tutorial,
                        ">= 1,500 items/s, flat in N",
                        extra,
                        dask_rates,
                    )
                )
        if "batched" in selected:
            for n in config.batched_ns:
                report(f"batched: {n} items (auto batch) x {config.runs} runs")
                rates, extra = bench_double(env, config, n, "auto")
                size = 10_000 if n >= 100_000 else 1_000
                reference = [celery_chunks(app, n, size, config.timeout) for _ in range(config.runs)]
                figures.append(
                    Figure(
                        "double, batched (auto)",
                        n,
                        "items/s",
                        rates,
                        f"Celery chunks({size:,})",
                        reference,
                        ">= 500,000 items/s at 1,000,000",
                        extra,
                    )
                )
    return figures


def table(figures: Sequence[Figure]) -> str:
    """The results as a Markdown table: median (min-max) of the runs."""
    lines = [
        "| benchmark | N | fanout | reference | ratio | Dask | fanout / Dask | target |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for f in figures:
        ratio = f"{f.median / f.reference_median:.2f}x" if f.reference_median else "-"
        ref = f"{f.reference}: {spread(f.reference_rates)}" if f.reference_rates else "-"
        dask = spread(f.dask_rates) if f.dask_rates else "-"
        dask_ratio = f"{f.median / f.dask_median:.2f}x" if f.dask_median else "-"
        lines.append(
            f"| {f.name} | {f.n:,} | {spread(f.rates)} {f.unit} | {ref} | {ratio} | {dask} | {dask_ratio} "
            f"| {f.target} |"
        )
    return "\n".join(lines)


def write_results(figures: Sequence[Figure], config: Config, out: Path) -> dict[str, Any]:
    import platform

    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "figures": [f.as_dict() for f in figures],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "results.md").write_text(table(figures) + "\n")
    return document
