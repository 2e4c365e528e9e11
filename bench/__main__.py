"""``python -m bench``: run the benchmarks, print the table, write JSON and a PNG plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from bench import out_option

SUITES = ("publish", "fanin", "images", "per-item", "batched")


def _ns(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("suites", nargs=-1, type=click.Choice([*SUITES, "all"]))
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 2,
    show_default="the CPU count",
    help="Pool processes per worker (the reference pool gets workers x concurrency).",
)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per figure.")
@click.option(
    "--photos",
    default="400,2000",
    show_default=True,
    help="Ns of 1920x1080 JPEGs to resize, each a row (whole commands, fresh processes).",
)
@click.option(
    "--noisy",
    default="2000",
    show_default=True,
    help="Ns of 1920x1080 JPEGs with sensor-like noise (decoding dominates), each a row ('' for none).",
)
@click.option("--per-item", "per_item", default="1000,10000,100000", show_default=True, help="Ns, batch 1.")
@click.option("--batched", default="10000,100000,1000000", show_default=True, help="Ns, auto batching.")
@click.option(
    "--dask-n",
    "dask_n",
    default="1000,10000",
    show_default=True,
    help="The per-item Ns at which Dask (one task per item) also runs.",
)
@click.option(
    "--fanin-n",
    "fanin_n",
    default="10000",
    show_default=True,
    help="Images whose tiles the fan-in benchmark pastes (the callback alone, in this process).",
)
@click.option(
    "--publish-n",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Header messages the publishing benchmark sends (no worker consumes them).",
)
@click.option(
    "--tutorial-n",
    type=int,
    default=1000,
    show_default=True,
    help="The per-item N at which the tutorial group(...).get() reference also runs (0: never).",
)
@click.option("--loglevel", default="INFO", show_default=True, help="The workers' log level.")
@click.option("--timeout", type=float, default=900, show_default=True, help="Bound on each run, seconds.")
@out_option("Where results.json, results.md, doubling.png and the inputs go.")
def main(
    suites: tuple[str, ...],
    workers: int,
    concurrency: int,
    runs: int,
    photos: str,
    noisy: str,
    per_item: str,
    batched: str,
    dask_n: str,
    fanin_n: str,
    publish_n: int,
    tutorial_n: int,
    loglevel: str,
    timeout: float,
    out: Path,
) -> None:
    """Run SUITES (publish, fanin, images, per-item, batched; default all) against FANOUT_REDIS_URL.

    Starts its own workers on that database (and refuses if others listen
    there), generates its inputs, and checks every result before it counts.
    """
    from bench.plot import plot
    from bench.suite import Config, run_suite, table, write_results

    selected = SUITES if not suites or "all" in suites else suites
    config = Config(
        workers=workers,
        concurrency=concurrency,
        runs=runs,
        photos=_ns(photos),
        noisy_photos=_ns(noisy),
        per_item_ns=_ns(per_item),
        dask_ns=_ns(dask_n),
        fanin_ns=_ns(fanin_n),
        batched_ns=_ns(batched),
        publish_n=publish_n,
        tutorial_n=tutorial_n,
        loglevel=loglevel,
        timeout=timeout,
        work_dir=out.resolve() / "work",
    )

    def report(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    figures = run_suite(config, selected, report)
    document = write_results(figures, config, out)
    title = (
        f"fanout doubling, {workers} worker(s) x {concurrency} processes, "
        f"{document['machine']['cpus']} CPUs, {document['when']}"
    )
    png = plot(figures, out / "doubling.png", title)
    click.echo(table(figures))
    click.echo(f"\nresults: {out / 'results.json'}" + (f", plot: {png}" if png else " (no plot)"))
    sys.exit(0)


if __name__ == "__main__":
    main()
