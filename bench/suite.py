"""The benchmarks: each target and its reference, measured in the same run.

Every benchmark starts its own ``celery worker`` processes (LocalWorker),
generates its own input (nothing is downloaded) and checks that the results
are complete and in input order before a figure counts.  Rates are items per
second over the CLI's own ``elapsed_s`` (from sending the header to the
fan-in), so the fixed start-up of a ``fanout`` process (interpreter, imports,
asking the workers for their pool sizes) is left out on both sides; the wall
time of the whole command is recorded beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
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
        return doc


@dataclass(frozen=True)
class Config:
    workers: int
    concurrency: int
    runs: int
    photos: int
    per_item_ns: tuple[int, ...]
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
    from orchestrator.local import LocalWorker
    from orchestrator.run import list_workers

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


def fanout_cli(env: dict[str, str], args: Sequence[str], timeout: float) -> tuple[dict[str, Any], float, int]:
    """Run ``fanout ARGS --json``; return its document, wall seconds and peak RSS in KiB.

    stdout goes to a file: a million results is a large document.
    """
    command = [
        sys.executable,
        "-c",
        _PEAK_RSS,
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        "--json",
        "--no-progress",
        "--timeout",
        str(timeout),
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        try:
            code = subprocess.run(command, env=env, stdout=out, stderr=err, timeout=timeout + 60).returncode
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench: fanout {' '.join(args)} did not finish in {timeout + 60:g} s") from None
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        if code != 0:
            raise SystemExit(f"bench: fanout {' '.join(args)} exited {code}: " + "\n".join(lines[-20:]))
        return json.loads(out.read()), wall, int(lines[-1])


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

    from orchestrator.canvas import build_double
    from orchestrator.publish import publish_chord

    client = redis_lib.Redis.from_url(app.conf.broker_url)
    n = config.publish_n
    ours: Rates = []
    theirs: Rates = []
    try:
        for _ in range(config.runs):
            job = build_double(list(range(n)), 1)
            started = time.perf_counter()
            publish_chord(app, job.signature)
            ours.append(n / (time.perf_counter() - started))
            _drain(client)
            job = build_double(list(range(n)), 1)
            started = time.perf_counter()
            result = job.signature.apply_async()
            theirs.append(n / (time.perf_counter() - started))
            for child in result.parent.results:
                app.backend.result_consumer.cancel_for(child.id)
            _drain(client)
    finally:
        _drain(client)
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


def _drain(client: Any) -> None:
    """Drop the benchmark's unconsumed messages and chord counters (this database only)."""
    client.delete("celery")
    for key in client.scan_iter("celery-taskset-meta-*", count=1000):
        client.delete(key)


# --------------------------------------------------------------------------- images


def _thumbnail(pair: tuple[str, str]) -> None:
    """What a user would write: Pillow's ``thumbnail`` with its defaults, saved as JPEG."""
    from PIL import Image

    source, destination = pair
    with Image.open(source) as im:
        im.thumbnail((256, 256))
        im.save(destination, "JPEG", quality=85)


def _resize_image(pair: tuple[str, str]) -> None:
    from workers.imaging import resize_image

    resize_image(pair[0], pair[1], 256)


def pool_rate(work: Callable[[tuple[str, str]], None], pairs: list[tuple[str, str]], processes: int) -> float:
    """Images per second through a ``ProcessPoolExecutor``, timed from its creation."""
    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        for _ in pool.map(work, pairs, chunksize=max(1, len(pairs) // (processes * 8))):
            pass
    return len(pairs) / (time.perf_counter() - started)


def photos(config: Config) -> Path:
    from orchestrator.samples import make_photos

    directory = config.work_dir / f"photos-{config.photos}"
    if len(list(directory.glob("*.jpg"))) != config.photos:
        make_photos(directory, config.photos)
    return directory


def bench_images(env: dict[str, str], config: Config) -> list[Figure]:
    source = photos(config)
    files = sorted(str(p) for p in source.glob("*.jpg"))
    out = config.work_dir / "out"
    pairs = [(f, str(out / "pool" / Path(f).name)) for f in files]
    (out / "pool").mkdir(parents=True, exist_ok=True)
    ours: Rates = []
    walls: list[float] = []
    thumb: Rates = []
    same_work: Rates = []
    bare: Rates = []
    for run in range(config.runs):
        thumb.append(pool_rate(_thumbnail, pairs, config.processes))
        same_work.append(pool_rate(_resize_image, pairs, config.processes))
        doc, wall, _ = fanout_cli(
            env,
            ["resize", str(source), "--out", str(out / f"fanout-{run}"), "--max-side", "256"],
            config.timeout,
        )
        if doc["failed"] or doc["total"] != len(files):
            raise SystemExit(f"bench: resize failed for {doc['failed']} of {doc['total']} images")
        ours.append(doc["total"] / doc["elapsed_s"])
        walls.append(round(wall, 3))
        doc, _, _ = fanout_cli(
            env,
            [
                "resize",
                str(source),
                "--out",
                str(out / f"bare-{run}"),
                "--max-side",
                "256",
                "--no-contact-sheet",
            ],
            config.timeout,
        )
        if doc["failed"] or doc["total"] != len(files):
            raise SystemExit(f"bench: resize failed for {doc['failed']} of {doc['total']} images")
        bare.append(doc["total"] / doc["elapsed_s"])
    return [
        Figure(
            f"resize {len(files)} photos 1920x1080 -> 256",
            len(files),
            "img/s",
            ours,
            f"ProcessPoolExecutor({config.processes}) + thumbnail",
            thumb,
            ">= 1.2x reference and >= 200 img/s (2 cores); >= 0.9x (16 cores)",
            {"wall_s": walls},
        ),
        Figure(
            f"resize {len(files)} photos -> 256, --no-contact-sheet",
            len(files),
            "img/s",
            bare,
            f"ProcessPoolExecutor({config.processes}) + thumbnail",
            thumb,
            "the same, without the callback reading every output back for the sheet",
        ),
        Figure(
            f"resize {len(files)} photos, same resize_image",
            len(files),
            "img/s",
            ours,
            f"ProcessPoolExecutor({config.processes}) + resize_image",
            same_work,
            "Celery's cost over a bare pool doing identical work",
        ),
    ]


# --------------------------------------------------------------------------- the whole suite


def run_suite(config: Config, selected: Sequence[str], report: Callable[[str], None]) -> list[Figure]:
    from workers.app import app

    env = dict(os.environ)
    figures: list[Figure] = []
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if "publish" in selected:
        report(f"publish: {config.publish_n} header messages x {config.runs} runs, no worker consuming")
        figures.append(bench_publish(app, config))
    with local_workers(app, config):
        if "images" in selected:
            report(f"images: {config.photos} photos x {config.runs} runs")
            figures.extend(bench_images(env, config))
        if "per-item" in selected:
            for n in config.per_item_ns:
                report(f"per-item: {n} tasks (batch 1) x {config.runs} runs")
                rates, extra = bench_double(env, config, n, "1")
                reference: Rates = []
                if n == config.tutorial_n:
                    reference = [tutorial_group(app, n, config.timeout) for _ in range(config.runs)]
                figures.append(
                    Figure(
                        "double, one task per item",
                        n,
                        "items/s",
                        rates,
                        "tutorial group(...).get()" if reference else "",
                        reference,
                        ">= 1,500 items/s, flat in N",
                        extra,
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
        "| benchmark | N | fanout | reference | ratio | target |",
        "| --- | ---: | ---: | --- | ---: | --- |",
    ]
    for f in figures:
        ratio = f"{f.median / f.reference_median:.2f}x" if f.reference_median else "-"
        ref = f"{f.reference}: {spread(f.reference_rates)}" if f.reference_rates else "-"
        lines.append(f"| {f.name} | {f.n:,} | {spread(f.rates)} {f.unit} | {ref} | {ratio} | {f.target} |")
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
