"""The ``fanout`` command line.

Exit codes: 0 every item succeeded; 1 the run completed but some items failed;
2 usage error; 3 infrastructure problem (Redis, workers, timeout).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from orchestrator.inputs import InputError, parse_numbers, parse_size, plan_images, plan_outputs
from workers.errors import ConfigError, InfrastructureError
from workers.resizing import ANCHORS, FORMATS, MODES, ResizeOptions

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
DEFAULT_TIMEOUT = 600.0

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    click.echo(f"fanout: error: {message}", err=True)
    sys.exit(code)


def handles_errors(func: F) -> F:
    """Turn fanout's errors into a one-line message and the exit code that means it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        except ConfigError as exc:
            _fail(f"configuration: {exc}", EXIT_USAGE)
        except InfrastructureError as exc:
            _fail(str(exc), EXIT_INFRA)

    return wrapper  # type: ignore[return-value]


def _app() -> Any:
    """The Celery app, imported late so a bad setting is reported, not a traceback."""
    from workers.app import app

    return app


class BatchSize(click.ParamType):  # type: ignore[type-arg]
    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or value == "auto":
            return None
        try:
            size = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)
        if size < 1:
            self.fail("must be at least 1", param, ctx)
        return size


def run_options(func: F) -> F:
    options = [
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="Seconds to wait for the whole run.",
        ),
        click.option(
            "--batch-size",
            type=BatchSize(),
            default="auto",
            show_default=True,
            help="Items per task; 1 sends one task per item.",
        ),
        click.option(
            "--progress/--no-progress",
            default=None,
            help="Progress bar on stderr [default: when stderr is a terminal].",
        ),
        click.option(
            "--no-wait",
            is_flag=True,
            help="Send the job, print its id and return; see it later with `fanout status JOB_ID`.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def execute(
    job_factory: Callable[[int], Any],
    total: int,
    batch_cap: int,
    batch_size: int | None,
    timeout: float,
    progress: bool,
    label: str,
    no_wait: bool = False,
    as_json: bool = False,
) -> tuple[Any, float]:
    """Send the job and wait for it; with ``no_wait``, print its id and exit 0 once it is sent."""
    from orchestrator.run import run_job, send_job

    if no_wait:
        job, _, _ = send_job(_app(), job_factory, total, batch_cap, batch_size)
        if as_json:
            import json

            doc = {"job_id": job.job_id, "task": job.task, "total": job.total, "batches": job.batches}
            click.echo(json.dumps(doc))
        else:
            click.echo(job.job_id)
            click.echo(
                f"sent job {job.job_id}: {job.total} items in {job.batches} batches. "
                f"See it with `fanout status {job.job_id}` (add --wait to wait for it).",
                err=True,
            )
        sys.exit(EXIT_OK)
    return run_job(_app(), job_factory, total, batch_cap, batch_size, timeout, progress, label)


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def finish(
    outcome: Any,
    elapsed: float,
    as_json: bool,
    write_text: Callable[[Any], None],
    extra: dict[str, Any] | None = None,
) -> None:
    from orchestrator import render

    if as_json:
        render.write_json(render.as_document(outcome, elapsed, extra), sys.stdout)
    else:
        write_text(outcome)
        render.write_errors(outcome, sys.stderr)
        click.echo(render.summary(outcome, elapsed), err=True)
    sys.exit(EXIT_ITEMS_FAILED if outcome["failed"] else EXIT_OK)


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
def double(
    numbers: tuple[str, ...],
    range_n: int | None,
    as_json: bool,
    timeout: float,
    batch_size: int | None,
    progress: bool | None,
    no_wait: bool,
) -> None:
    """Double NUMBERS (integers of any size; '-' reads them from stdin)."""
    from orchestrator import render
    from orchestrator.canvas import MAX_DOUBLE_BATCH, build_double

    if range_n is not None and numbers:
        raise click.UsageError("give NUMBERS or --range, not both")
    if range_n is not None:
        values: list[int] = list(range(range_n))
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
    outcome, elapsed = execute(
        lambda size: build_double(values, size),
        len(values),
        MAX_DOUBLE_BATCH,
        batch_size,
        timeout,
        _show(progress),
        "doubling",
        no_wait,
        as_json,
    )
    finish(outcome, elapsed, as_json, lambda o: render.write_double(o, sys.stdout))


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
    "--contact-sheet/--no-contact-sheet",
    "sheet",
    default=True,
    show_default=True,
    help="Write contact-sheet.png next to manifest.json (the callback reads every output back for it).",
)
@run_options
@handles_errors
def resize(
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
    as_json: bool,
    timeout: float,
    batch_size: int | None,
    progress: bool | None,
    no_wait: bool,
) -> None:
    """Resize the images in SOURCES into --out.

    SOURCES are image files, directories (walked recursively) or s3:// prefixes;
    s3:// takes credentials and endpoint from AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL.  manifest.json and (unless
    --no-contact-sheet) contact-sheet.png are written next to the outputs.
    """
    from orchestrator import render
    from orchestrator.canvas import MAX_RESIZE_BATCH, build_resize_items
    from workers import storage
    from workers.report import CONTACT_SHEET, MANIFEST, images

    boxes = [parse_size(s) for s in sizes] + ([(max_side, max_side)] if max_side else [])
    boxes = list(dict.fromkeys(boxes))
    if not boxes:
        raise click.UsageError("give a size: --size N|WxH (repeatable) or --max-side N")
    try:
        options = ResizeOptions(mode, anchor, fmt, quality, upscale, background)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    plan = plan_images(sources, out_dir)
    out = storage.normalize(out_dir)
    if plan.skipped and not as_json:
        click.echo(f"skipped {len(plan.skipped)} non-image files", err=True)
    if not plan.pairs:
        raise click.UsageError("no images found in SOURCES")
    if storage.is_local(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    items = plan_outputs(plan.pairs, boxes, fmt)
    outcome, elapsed = execute(
        lambda size: build_resize_items(items, options.to_json(), out, len(boxes), size, sheet=sheet),
        len(items),
        MAX_RESIZE_BATCH,
        batch_size,
        timeout,
        _show(progress),
        "resizing",
        no_wait,
        as_json,
    )
    manifest_url = storage.join(out, MANIFEST)
    sheet_url: str | None = storage.join(out, CONTACT_SHEET)
    if not sheet or not storage.exists(str(sheet_url)):
        sheet_url = None  # not asked for, or the callback logged why; the manifest is the record
    if not as_json:
        click.echo(f"manifest: {manifest_url}", err=True)
        if sheet:
            click.echo(f"contact sheet: {sheet_url or 'not written (see the worker log)'}", err=True)
    finish(
        outcome,
        elapsed,
        as_json,
        lambda o: render.write_resize(o, sys.stdout),
        {
            "skipped": len(plan.skipped),
            "manifest": manifest_url,
            "contact_sheet": sheet_url,
            "images": images(outcome, len(boxes)),
        },
    )


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to finish, then show its results.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds --wait waits.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr with --wait [default: when stderr is a terminal].",
)
@handles_errors
def status(job_id: str, as_json: bool, wait_: bool, timeout: float, progress: bool | None) -> None:
    """Show the progress, or the results, of job JOB_ID (sent earlier, e.g. with --no-wait).

    A finished job prints what its run would have printed, with the same exit
    code; a running one prints how far it got and exits 0 (or waits, with --wait).
    """
    import json

    from orchestrator import render
    from orchestrator.run import check_redis, wait
    from orchestrator.status import StoredJob, UnknownJob, job_status
    from workers.settings import get_settings

    check_redis(get_settings())
    app = _app()
    try:
        current = job_status(app, job_id)
    except UnknownJob as exc:
        _fail(str(exc), EXIT_USAGE)
    outcome, elapsed = current.outcome, current.elapsed_s
    if outcome is None and wait_:
        job: StoredJob = current.job
        with render.progress_bar(_show(progress), f"job {job.task}", job.total, job.batch_size) as update:
            outcome = wait(app, job, job.group_id, timeout, update)
        elapsed = job_status(app, job_id).elapsed_s
    if outcome is None:
        if as_json:
            click.echo(json.dumps(current.document()))
        else:
            click.echo(current.line())
        sys.exit(EXIT_OK)
    writer = render.write_resize if outcome["task"] == "resize" else render.write_double
    finish(outcome, elapsed, as_json, lambda o: writer(o, sys.stdout))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON.")
@handles_errors
def workers(as_json: bool) -> None:
    """List the workers that answer, with their concurrency."""
    import json

    from orchestrator.run import check_redis, list_workers
    from workers.settings import get_settings

    check_redis(get_settings())
    found = list_workers(_app())
    if as_json:
        click.echo(json.dumps([{"name": w.name, "concurrency": w.concurrency} for w in found]))
    else:
        for w in found:
            click.echo(f"{w.name}\tconcurrency {w.concurrency}")
    if not found:
        _fail("no worker answered. Start one with `celery -A workers worker`.", EXIT_INFRA)


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
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each run.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
@handles_errors
def demo(
    directory: Path, photos: int, max_side: int, numbers: int, timeout: float, progress: bool | None
) -> None:
    """Generate sample photos, resize them and double numbers across the workers.

    Starts local workers for the demo's duration if none answer.
    """
    from orchestrator.demo import run_demo

    sys.exit(
        run_demo(
            directory,
            photos,
            max_side,
            numbers,
            timeout,
            sys.stderr.isatty() if progress is None else progress,
        )
    )
