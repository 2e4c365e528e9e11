"""The ``fanout`` commands: each parses its arguments, calls the library, renders, and exits once.

Exit codes: 0 every item succeeded; 1 the run completed but some items failed;
2 usage error; 3 infrastructure problem (Redis, workers, timeout); 130 interrupted.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import click

from orchestrator import builtin, render
from orchestrator.cli.options import (
    EXIT_INFRA,
    EXIT_OK,
    RunOptions,
    error,
    handles_errors,
    json_option,
    run_options,
    show_progress,
    timeout_option,
)
from orchestrator.cli.running import announce, attach, counts, run_job, show, wait
from orchestrator.cli.running import stream as stream_job
from orchestrator.demo import run_demo
from orchestrator.discovery import list_workers
from orchestrator.inputs import (
    load_task,
    parse_json_object,
    parse_numbers,
    parse_size,
    plan_images,
    plan_outputs,
)
from orchestrator.jobs import DEFAULT_TIMEOUT
from orchestrator.local import available_cores, worker_command
from orchestrator.plan import prepare
from orchestrator.send import check_redis, spec_of
from orchestrator.send import retry as retry_job
from orchestrator.stream import JsonLines
from workers import storage
from workers.app import app
from workers.errors import InputError
from workers.report import MANIFEST, images
from workers.resizing import ANCHORS, FORMATS, MODES, ResizeOptions
from workers.results import materialize
from workers.settings import Settings, get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fanout")
def main() -> None:
    """Fan work out to Celery workers over Redis and gather the results in input order.

    Redis comes from FANOUT_REDIS_URL (default redis://localhost:6379/0).
    """


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("numbers", nargs=-1)
@click.option("--range", "range_n", type=click.IntRange(min=0), help="Double 0..N-1 instead of NUMBERS.")
@run_options
@handles_errors
@click.pass_context
def double(ctx: click.Context, numbers: tuple[str, ...], range_n: int | None, run: RunOptions) -> None:
    """Double NUMBERS (integers of any size; '-' reads them from stdin)."""
    if range_n is not None and numbers:
        raise click.UsageError("give NUMBERS or --range, not both")
    values: Sequence[int]
    if range_n is not None:
        values = range(range_n)  # never listed: a big range travels by its bounds
    elif numbers == ("-",):
        values = parse_numbers(sys.stdin.read().split())
    elif "-" in numbers:
        raise click.UsageError("'-' (read stdin) cannot be mixed with NUMBERS")
    elif numbers:
        values = parse_numbers(numbers)
    else:
        raise click.UsageError("nothing to double: give NUMBERS, '-' or --range N")
    if not values:
        raise click.UsageError("nothing to double: the input holds no numbers")
    ran = run_job(builtin.double(values), run, "doubling")
    if ran.outcome is None:
        ctx.exit(ran.code)
    ctx.exit(show(ran.outcome, ran.elapsed, run.as_json, render.write_double))


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--out",
    "out_dir",
    required=True,
    metavar="DIR|URL",
    help="Directory or s3:// prefix for the resized images (a directory is created if missing).",
)
@click.option(
    "--size",
    "sizes",
    multiple=True,
    metavar="N|WxH",
    help="Target box in pixels (N is NxN); repeat for several sizes, one output per image and size.",
)
@click.option(
    "--max-side",
    type=click.IntRange(min=1),
    help="Shorthand for --size N: the longest side of a fit, in pixels.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="fit",
    show_default=True,
    help="fit within the box keeping aspect; fill it and crop to it exactly; exact: stretch to it.",
)
@click.option(
    "--anchor",
    type=click.Choice(list(ANCHORS)),
    default="center",
    show_default=True,
    help="Which part of the image --mode fill keeps.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(FORMATS)),
    default="keep",
    show_default=True,
    help="Output format; keep writes the source's format.",
)
@click.option(
    "--quality",
    type=click.IntRange(1, 100),
    default=85,
    show_default=True,
    help="JPEG and WebP quality.",
)
@click.option(
    "--upscale/--no-upscale",
    default=False,
    show_default=True,
    help="Enlarge images smaller than the box (off: they keep their size).",
)
@click.option(
    "--background",
    default="#ffffff",
    show_default=True,
    help="Colour that transparency is flattened onto for JPEG output.",
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Leave an output that already exists and opens as an image; the manifest lists it as skipped.",
)
@click.option(
    "--contact-sheet/--no-contact-sheet",
    "sheet",
    default=True,
    show_default=True,
    help="Write contact-sheet.png (pages for large runs) next to manifest.json, from tiles the workers make.",
)
@run_options
@handles_errors
@click.pass_context
def resize(
    ctx: click.Context,
    sources: tuple[str, ...],
    out_dir: str,
    sizes: tuple[str, ...],
    max_side: int | None,
    mode: str,
    anchor: str,
    fmt: str,
    quality: int,
    upscale: bool,
    background: str,
    sheet: bool,
    skip_existing: bool,
    run: RunOptions,
) -> None:
    """Resize the images in SOURCES into --out.

    SOURCES are image files, directories (walked recursively) or s3:// prefixes;
    s3:// takes credentials and endpoint from AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL.  manifest.json and (unless
    --no-contact-sheet) contact-sheet.png are written next to the outputs.
    """
    boxes = [parse_size(s) for s in sizes] + ([(max_side, max_side)] if max_side else [])
    boxes = list(dict.fromkeys(boxes))
    if not boxes:
        raise click.UsageError("give a size: --size N|WxH (repeatable) or --max-side N")
    # No sheet, no tiles: the workers make each image's tile only for the sheet.
    options = ResizeOptions(mode, anchor, fmt, quality, upscale, background, tile=sheet)
    as_json = run.as_json
    found = plan_images(sources, out_dir)
    out = storage.normalize(out_dir)
    if found.skipped and not as_json:
        click.echo(f"skipped {len(found.skipped)} non-image files", err=True)
    if not found.pairs:
        raise click.UsageError("no images found in SOURCES")
    if storage.is_local(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    items = plan_outputs(found.pairs, boxes, fmt)
    plan = builtin.resize_items(
        items, options.to_json(), out, len(boxes), sheet=sheet, skip_existing=skip_existing
    )
    ran = run_job(plan, run, "resizing")
    if ran.outcome is None:
        ctx.exit(ran.code)
    outcome = materialize(ran.outcome)  # the manifest groups every output by image: a resize job's lists fit
    report = outcome.get("reduced") or {}
    manifest_url = report.get("manifest") or storage.join(out, MANIFEST)
    # None when not asked for, or the callback logged why; the manifest is the record.
    sheet_url: str | None = report.get("contact_sheet")
    pages: list[str] = list(report.get("contact_sheets") or ([sheet_url] if sheet_url else []))
    if not as_json:
        click.echo(f"manifest: {manifest_url}", err=True)
        if sheet and len(pages) > 1:
            click.echo(f"contact sheet: {len(pages)} pages, {pages[0]} ... {pages[-1]}", err=True)
        elif sheet:
            click.echo(f"contact sheet: {sheet_url or 'not written (see the worker log)'}", err=True)
    extra = {
        "skipped": len(found.skipped),
        "manifest": manifest_url,
        "contact_sheet": sheet_url,
        "contact_sheets": pages,
        "images": images(outcome, len(boxes)),
    }
    ctx.exit(show(outcome, ran.elapsed, as_json, render.write_resize, extra))


@main.command()
@click.argument("job_id")
@json_option
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to finish, then show its results.")
@timeout_option(DEFAULT_TIMEOUT, "--wait waits")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr with --wait [default: when stderr is a terminal].",
)
@handles_errors
@click.pass_context
def status(
    ctx: click.Context, job_id: str, as_json: bool, wait_: bool, timeout: float, progress: bool | None
) -> None:
    """Show the progress, or the results, of job JOB_ID (sent earlier, e.g. with --no-wait).

    A finished job prints what its run would have printed, with the same exit
    code; a running one prints how far it got and exits 0 (or waits, with --wait).
    """
    job = attach(job_id)
    current = job.status()
    outcome, elapsed = current.outcome, current.elapsed_s
    if outcome is None and wait_:
        with render.progress_bar(
            show_progress(progress), f"job {job.task}", job.total, job.shown_batch_size
        ) as update:
            outcome = job.wait(timeout, update).data
        elapsed = job.status().elapsed_s
    if outcome is None:
        click.echo(json.dumps(current.document()) if as_json else current.line())
        ctx.exit(EXIT_OK)
    ctx.exit(show(outcome, elapsed, as_json, render.writer(job.output)))


@main.command()
@click.argument("job_id")
@click.option("--terminate", is_flag=True, help="Also interrupt the items running now.")
@click.option(
    "--wait/--no-wait",
    "wait_",
    default=True,
    show_default=True,
    help="Wait for the job to end and print its counts.",
)
@timeout_option(60.0, "--wait waits")
@handles_errors
def cancel(job_id: str, terminate: bool, wait_: bool, timeout: float) -> None:
    """Cancel job JOB_ID: queued batches never start, running ones stop at their next item.

    The fan-in still completes: finished items keep their results, every other
    item fails with "cancelled".  Works on a job sent from any machine.
    """
    job = attach(job_id)
    job.cancel(terminate=terminate)
    click.echo(f"cancelling job {job_id}{' (interrupting running items)' if terminate else ''}", err=True)
    if wait_:
        outcome = job.wait(timeout).data
        click.echo(f"job {job_id}: {counts(outcome)} ({outcome.get('stopped') or 'it had finished'})")


@main.command()
@click.argument("job_id")
@run_options
@handles_errors
@click.pass_context
def retry(ctx: click.Context, job_id: str, run: RunOptions) -> None:
    """Send the failed and cancelled items of finished job JOB_ID again, as a new job.

    Prints the merged outcome, in the original input order: earlier successes
    carried over, the retried items' new results in their places (for resize,
    into the same --out, with a new manifest.json).
    """
    started = time.perf_counter()
    job = retry_job(attach(job_id).job_id, run.batch_size or "auto")
    click.echo(f"retrying {job.total} items of job {job_id} as job {job.id}", err=True)
    if run.no_wait:
        announce(job, run.as_json)
        ctx.exit(EXIT_OK)
    ran = wait(job, run, f"retry of {job_id}", started)
    if ran.outcome is None:
        ctx.exit(ran.code)
    ctx.exit(show(ran.outcome, ran.elapsed, run.as_json, render.writer(job.output)))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON.")
@handles_errors
@click.pass_context
def workers(ctx: click.Context, as_json: bool) -> None:
    """List the running workers, with their concurrency and the tasks they have."""
    settings = get_settings()
    check_redis(settings)
    found = list_workers(app, settings.queue)
    if as_json:
        rows = [
            {"name": w.name, "concurrency": w.concurrency, "tasks": sorted(w.tasks), "queues": list(w.queues)}
            for w in found
        ]
        click.echo(json.dumps(rows))
    else:
        for w in found:
            click.echo(f"{w.name}\tconcurrency {w.concurrency}\t{len(w.tasks)} tasks")
    if not found:
        error(f"no worker is running on queue {settings.queue}. Start one with `fanout worker`.")
        ctx.exit(EXIT_INFRA)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="A module defining @fanout.task functions (repeatable; added to FANOUT_IMPORTS).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Worker processes [default: the cores this process may use].",
)
@click.pass_context
@handles_errors
def worker(ctx: click.Context, imports: tuple[str, ...], concurrency: int | None) -> None:
    """Run a worker: `celery -A workers worker` with fanout's defaults.

    Arguments after the options go to `celery worker` as they are (e.g. --loglevel WARNING).
    """
    env = dict(os.environ)
    modules = [m for m in (env.get("FANOUT_IMPORTS") or "").split(",") if m.strip()] + list(imports)
    env["FANOUT_IMPORTS"] = ",".join(dict.fromkeys(m.strip() for m in modules))
    Settings.from_env(env)  # a bad setting is reported here, before the worker starts
    # The user's modules are imported from here, as `celery -A` does.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    command = worker_command(concurrency or available_cores(), list(ctx.args))
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


@main.command("map")
@click.argument("function", metavar="MODULE:FUNCTION")
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    required=True,
    help="JSON Lines, one item per line; - reads stdin.",
)
@click.option(
    "--kwargs",
    "kwargs_json",
    metavar="JSON",
    help="Keyword arguments for every call, as a JSON object (e.g. '{\"scale\": 2}').",
)
@click.option(
    "--reduce",
    "reduce_spec",
    metavar="MODULE:FUNCTION",
    help="A @fanout.task run on a worker over (results, errors); prints its value.",
)
@click.option("--stream", is_flag=True, help="Print each result as its batch finishes (out of order).")
@run_options
@handles_errors
@click.pass_context
def map_command(
    ctx: click.Context,
    function: str,
    input_path: str,
    kwargs_json: str | None,
    reduce_spec: str | None,
    stream: bool,
    run: RunOptions,
) -> None:
    """Run the @fanout.task MODULE:FUNCTION over every item of --input, on the workers.

    Prints JSON Lines in input order: {"index": i, "result": r} or {"index": i, "error": "..."}.
    The workers must have the task: FANOUT_IMPORTS=MODULE (or `fanout worker --import MODULE`).
    """
    if stream and run.as_json:
        raise click.UsageError("--stream and --json cannot be combined")
    task = load_task(function, "MODULE:FUNCTION")
    reducer = load_task(reduce_spec, "--reduce") if reduce_spec else None
    kwargs = parse_json_object(kwargs_json, "--kwargs") if kwargs_json else None
    # Read as it is sent: a few lines are a job like any other, many are streamed
    # (checked and spooled to the results location, never held: orchestrator/stream.py).
    lines = read_lines(input_path)
    first = next(lines, None)
    if first is None:
        raise click.UsageError("--input holds no items")
    plan = prepare(spec_of(task, kwargs=kwargs, reduce=reducer), JsonLines(itertools.chain((first,), lines)))
    if stream and not run.no_wait:
        ctx.exit(stream_job(plan, run, reducer is not None or task.fold is not None))
    ran = run_job(plan, run, task.name)
    if ran.outcome is None:
        ctx.exit(ran.code)
    writer = render.write_reduced if reducer is not None else render.write_jsonl
    ctx.exit(show(ran.outcome, ran.elapsed, run.as_json, writer))


def read_lines(path: str) -> Iterator[str]:
    """The lines of ``path`` (``-``: stdin) as UTF-8 text, read in blocks: a line costs about
    0.1 us this way, where click's own stdin wrapper costs nearly 2 us."""
    binary = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    text = io.TextIOWrapper(binary, encoding="utf-8")
    try:
        for block in iter(lambda: text.readlines(1 << 16), []):
            yield from block
    except UnicodeDecodeError as exc:
        raise InputError(f"--input is not UTF-8 text ({exc}); nothing was sent") from None
    finally:
        if path == "-":
            text.detach()  # stdin stays open
        else:
            text.close()


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fanout-demo"),
    show_default=True,
    help="Where the sample photos and the outputs go.",
)
@click.option(
    "--photos",
    type=click.IntRange(min=1, max=2000),
    default=48,
    show_default=True,
    help="How many sample photos to generate.",
)
@click.option("--max-side", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--numbers",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="How many numbers the doubling run doubles.",
)
@timeout_option(DEFAULT_TIMEOUT, "to wait for each run")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
@handles_errors
@click.pass_context
def demo(
    ctx: click.Context,
    directory: Path,
    photos: int,
    max_side: int,
    numbers: int,
    timeout: float,
    progress: bool | None,
) -> None:
    """Generate sample photos, resize them and double numbers across the workers.

    Starts local workers for the demo's duration if none answer.
    """
    ctx.exit(run_demo(directory, photos, max_side, numbers, timeout, show_progress(progress)))
