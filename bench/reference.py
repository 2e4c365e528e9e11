"""The reference programs, each run by the suite as a fresh process and timed as a whole command.

``python -m bench.reference KIND ...`` is what a user would write instead of
``fanout``:

- ``pool-resize SRC OUT``: a ``ProcessPoolExecutor`` running fanout's own
  resize function (:func:`workers.imaging.resize_image`, the same decode, draft,
  Lanczos and encode as a ``fanout resize`` item) over every ``*.jpg`` in SRC;
- ``pool-thumbnail SRC OUT``: the same pool running Pillow's ``thumbnail`` with
  its defaults, saved as JPEG;
- ``dask-resize SRC OUT``: ``distributed.LocalCluster`` with ``client.map`` of
  the same resize function;
- ``dask-double N``: the same cluster, one task per number (``client.map`` of
  :func:`workers.doubling.double`).

Each prints one JSON line: how many items, and for Dask how long the cluster
took to start and the map itself (``job_s``), so the cost of its start-up can be
told from its throughput.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

MAX_SIDE = 256


def resize(pair: tuple[str, str]) -> None:
    """fanout's resize of one image: what a ``fanout resize --max-side 256`` item does, minus the tile."""
    from workers.imaging import resize_image

    resize_image(pair[0], pair[1], MAX_SIDE)


def thumbnail(pair: tuple[str, str]) -> None:
    """What a user would write: Pillow's ``thumbnail`` with its defaults, saved as JPEG."""
    from PIL import Image

    source, destination = pair
    with Image.open(source) as im:
        im.thumbnail((MAX_SIDE, MAX_SIDE))
        im.save(destination, "JPEG", quality=85)


def pairs(source: Path, out: Path) -> list[tuple[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    return [(str(p), str(out / p.name)) for p in sorted(source.glob("*.jpg"))]


@click.group()
def main() -> None:
    """Reference programs for the benchmarks (run by bench.suite, one process each)."""


@main.command("pool-resize")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--processes", type=click.IntRange(min=1), required=True)
def pool_resize(source: Path, out: Path, processes: int) -> None:
    """fanout's resize function over a ProcessPoolExecutor."""
    _pool(resize, pairs(source, out), processes)


@main.command("pool-thumbnail")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--processes", type=click.IntRange(min=1), required=True)
def pool_thumbnail(source: Path, out: Path, processes: int) -> None:
    """Pillow's thumbnail over a ProcessPoolExecutor."""
    _pool(thumbnail, pairs(source, out), processes)


def _pool(work: Callable[[tuple[str, str]], None], items: list[tuple[str, str]], processes: int) -> None:
    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        # A few chunks per process: large enough to amortise the pipe, small enough to balance.
        for _ in pool.map(work, items, chunksize=max(1, len(items) // (processes * 8))):
            pass
    _print(len(items), job_s=time.perf_counter() - started)


@main.command("dask-resize")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--processes", type=click.IntRange(min=1), required=True)
def dask_resize(source: Path, out: Path, processes: int) -> None:
    """fanout's resize function, one Dask task per image."""
    items = pairs(source, out)
    with _cluster(processes) as (client, start_s):
        started = time.perf_counter()
        client.gather(client.map(resize, items))
        job_s = time.perf_counter() - started
    _print(len(items), job_s=job_s, start_s=start_s)


@main.command("dask-double")
@click.argument("n", type=click.IntRange(min=1))
@click.option("--processes", type=click.IntRange(min=1), required=True)
def dask_double(n: int, processes: int) -> None:
    """Double 0..N-1, one Dask task per number; checks the results."""
    from workers.doubling import double

    with _cluster(processes) as (client, start_s):
        started = time.perf_counter()
        results = client.gather(client.map(double, range(n)))
        job_s = time.perf_counter() - started
    if results != [2 * i for i in range(n)]:
        raise SystemExit("dask-double: results incomplete or out of order")
    _print(n, job_s=job_s, start_s=start_s)


@contextmanager
def _cluster(processes: int) -> Iterator[tuple[Any, float]]:
    """A LocalCluster of ``processes`` single-threaded worker processes, a client on it, its start-up time."""
    import distributed

    started = time.perf_counter()
    dask: Any = distributed  # untyped
    # No dashboard: a web server the benchmark does not use.
    cluster = dask.LocalCluster(
        n_workers=processes, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = dask.Client(cluster)
    try:
        yield client, time.perf_counter() - started
    finally:
        client.close()
        cluster.close()


def _print(items: int, **seconds: float) -> None:
    print(json.dumps({"items": items, **{k: round(v, 4) for k, v in seconds.items()}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
