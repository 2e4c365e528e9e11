"""The ``fanout`` command line.

Exit codes: 0 every item succeeded; 1 the run completed but some items failed;
2 usage error; 3 infrastructure problem (Redis, workers, timeout).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from orchestrator.inputs import InputError, parse_numbers, parse_size, plan_images, plan_outputs
from workers.errors import ConfigError, FanoutError, InfrastructureError
from workers.resizing import ANCHORS, FORMATS, MODES, ResizeOptions

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
#: Interrupted (Ctrl-C): the job was cancelled, or left running after a second Ctrl-C.
EXIT_INTERRUPTED = 130
#: How long Ctrl-C waits for the cancelled job's counts before leaving, seconds.
CANCEL_WAIT_S = 30.0
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


@dataclass(frozen=True)
class RunOptions:
    """The options every command that runs a job takes (see :func:`run_options`)."""

    as_json: bool
    timeout: float
    batch_size: int | None
    progress: bool | None
    no_wait: bool
    max_failures: str | None

    @property
    def show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else self.progress


def run_options(func: F) -> F:
    """Add the options of a command that runs a job; the command gets them as ``run: RunOptions``."""
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
        click.option(
            "--max-failures",
            metavar="N|P%",
            help="Cancel the job once more than N items (or P% of them) have failed [default: no limit].",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        names = ("as_json", "timeout", "batch_size", "progress", "no_wait", "max_failures")
        run = RunOptions(**{name: kwargs.pop(name) for name in names})
        return func(*args, run=run, **kwargs)

    command: Any = wrapper
    for option in reversed(options):
        command = option(command)
    return command  # type: ignore[no-any-return]


def execute(
    job_factory: Callable[[int], Any],
    total: int,
    batch_cap: int,
    run: RunOptions,
    label: str,
    requires: tuple[str, ...] = (),
) -> tuple[Any, float]:
    """Send the job and wait for it; with ``--no-wait``, print its id and exit 0 once it is sent.

    Returns the outcome (as stored, a dict) and the seconds from sending to the fan-in.
    Ctrl-C while waiting cancels the job (see :func:`interrupted`).
    """
    from orchestrator import jobs

    try:
        job, sent = jobs.start(
            job_factory, total, batch_cap, run.batch_size, requires, _app(), max_failures=run.max_failures
        )
    except KeyboardInterrupt:
        click.echo("\ninterrupted while sending: whatever part of the job was sent is cancelled", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if run.no_wait:
        announce(job, run.as_json)
        sys.exit(EXIT_OK)
    return follow(job, sent, run, label)


def follow(job: Any, sent: float, run: RunOptions, label: str) -> tuple[Any, float]:
    """Wait for ``job`` with a progress bar; Ctrl-C cancels it.  Returns the outcome and the seconds taken."""
    import time

    from orchestrator.render import progress_bar

    try:
        with progress_bar(run.show_progress, label, job.total, job.batch_size) as update:
            outcome = job.wait(run.timeout, update)
    except KeyboardInterrupt:
        interrupted(job)
    return outcome.data, time.perf_counter() - sent


def interrupted(job: Any) -> None:
    """Ctrl-C on a waiting run: cancel the job, wait (briefly) for its counts, exit 130.

    A second Ctrl-C leaves at once, saying how to follow or cancel the job.
    """
    click.echo(f"\ncancelling job {job.id} (Ctrl-C again to leave it running as it stops)", err=True)
    try:
        job.cancel()
        outcome = job.wait(CANCEL_WAIT_S).data
    except KeyboardInterrupt:
        click.echo(
            f"left job {job.id}: `fanout status {job.id}` follows it, `fanout cancel {job.id}` stops it",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except FanoutError as exc:
        click.echo(f"fanout: error: {exc}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    cancelled = _cancelled(outcome)
    click.echo(
        f"job {job.id} cancelled: {outcome['succeeded']} done, {cancelled} cancelled, "
        f"{outcome['failed'] - cancelled} failed",
        err=True,
    )
    sys.exit(EXIT_INTERRUPTED)


def _cancelled(outcome: Any) -> int:
    """How many of the outcome's items failed for the reason the job was stopped."""
    from workers.results import outcome_errors

    return sum(1 for e in outcome_errors(outcome) if e["error"] == outcome.get("stopped"))


def announce(job: Any, as_json: bool) -> None:
    """What ``--no-wait`` prints: the job id on stdout, how to follow it on stderr."""
    import json

    if as_json:
        doc = {"job_id": job.id, "task": job.task, "total": job.total, "batches": job.batches}
        click.echo(json.dumps(doc))
        return
    click.echo(job.id)
    click.echo(
        f"sent job {job.id}: {job.total} items in {job.batches} batches. "
        f"See it with `fanout status {job.id}` (add --wait to wait for it).",
        err=True,
    )


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def finish(
    outcome: Any,
    elapsed: float,
    as_json: bool,
    write_text: Callable[[Any, Any], None],
    extra: dict[str, Any] | None = None,
) -> None:
    from orchestrator import render

    if as_json:
        render.write_document(outcome, elapsed, sys.stdout, extra)
    elif sys.stdout.isatty():
        # A person reads a terminal: the first lines and a summary, not 10,000 lines.
        head = render.Head(sys.stdout, render.TERMINAL_LINES)
        write_text(outcome, head)
        if head.held_back:
            click.echo(f"... and {head.held_back:,} more lines: redirect stdout, or use --json, for them all")
        render.write_errors(outcome, sys.stderr, limit=render.TERMINAL_LINES)
        click.echo(render.summary(outcome, elapsed), err=True)
    else:
        write_text(outcome, sys.stdout)
        render.write_errors(outcome, sys.stderr)
        click.echo(render.summary(outcome, elapsed), err=True)
    sys.exit(EXIT_ITEMS_FAILED if outcome["failed"] or outcome.get("reduce_error") else EXIT_OK)


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
def double(numbers: tuple[str, ...], range_n: int | None, run: RunOptions) -> None:
    """Double NUMBERS (integers of any size; '-' reads them from stdin)."""
    from orchestrator import render
    from orchestrator.canvas import DOUBLE, MAX_DOUBLE_BATCH, build_double

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
    outcome, elapsed = execute(
        lambda size: build_double(values, size), len(values), MAX_DOUBLE_BATCH, run, "doubling", (DOUBLE,)
    )
    finish(outcome, elapsed, run.as_json, render.write_double)


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
    skip_existing: bool,
    run: RunOptions,
) -> None:
    """Resize the images in SOURCES into --out.

    SOURCES are image files, directories (walked recursively) or s3:// prefixes;
    s3:// takes credentials and endpoint from AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL.  manifest.json and (unless
    --no-contact-sheet) contact-sheet.png are written next to the outputs.
    """
    from orchestrator import render
    from orchestrator.canvas import MAX_RESIZE_BATCH, RESIZE, RESIZE_REPORT, build_resize_items
    from workers import storage
    from workers.report import MANIFEST, images

    boxes = [parse_size(s) for s in sizes] + ([(max_side, max_side)] if max_side else [])
    boxes = list(dict.fromkeys(boxes))
    if not boxes:
        raise click.UsageError("give a size: --size N|WxH (repeatable) or --max-side N")
    try:
        # No sheet, no tiles: the workers make each image's tile only for the sheet.
        options = ResizeOptions(mode, anchor, fmt, quality, upscale, background, tile=sheet)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    as_json = run.as_json
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
        lambda size: build_resize_items(
            items, options.to_json(), out, len(boxes), size, sheet=sheet, skip_existing=skip_existing
        ),
        len(items),
        MAX_RESIZE_BATCH,
        run,
        "resizing",
        (RESIZE, RESIZE_REPORT),
    )
    from workers.results import materialize

    outcome = materialize(outcome)  # the manifest groups every output by image: a resize job's lists fit
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
    finish(
        outcome,
        elapsed,
        as_json,
        render.write_resize,
        {
            "skipped": len(plan.skipped),
            "manifest": manifest_url,
            "contact_sheet": sheet_url,
            "contact_sheets": pages,
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
    writer = render.writer(current.job.output)
    finish(outcome, elapsed, as_json, writer)


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
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds --wait waits.",
)
@handles_errors
def cancel(job_id: str, terminate: bool, wait_: bool, timeout: float) -> None:
    """Cancel job JOB_ID: queued batches never start, running ones stop at their next item.

    The fan-in still completes: finished items keep their results, every other
    item fails with "cancelled".  Works on a job sent from any machine.
    """
    from orchestrator import jobs
    from orchestrator.run import check_redis
    from orchestrator.status import UnknownJob
    from workers.settings import get_settings

    check_redis(get_settings())
    try:
        job = jobs.Job.attach(job_id, _app())
    except UnknownJob as exc:
        _fail(str(exc), EXIT_USAGE)
    job.cancel(terminate=terminate)
    click.echo(f"cancelling job {job_id}{' (interrupting running items)' if terminate else ''}", err=True)
    if not wait_:
        return
    outcome = job.wait(timeout).data
    cancelled = _cancelled(outcome)
    click.echo(
        f"job {job_id}: {outcome['succeeded']} done, {cancelled} cancelled, "
        f"{outcome['failed'] - cancelled} failed ({outcome.get('stopped') or 'it had finished'})"
    )


@main.command()
@click.argument("job_id")
@run_options
@handles_errors
def retry(job_id: str, run: RunOptions) -> None:
    """Send the failed and cancelled items of finished job JOB_ID again, as a new job.

    Prints the merged outcome, in the original input order: earlier successes
    carried over, the retried items' new results in their places (for resize,
    into the same --out, with a new manifest.json).
    """
    from orchestrator import jobs, render
    from orchestrator.run import check_redis
    from workers.settings import get_settings

    check_redis(get_settings())
    job = jobs.retry(job_id, run.batch_size or "auto", _app())
    click.echo(f"retrying {job.total} items of job {job_id} as job {job.id}", err=True)
    if run.no_wait:
        announce(job, run.as_json)
        sys.exit(EXIT_OK)
    import time

    outcome, elapsed = follow(job, time.perf_counter(), run, f"retry of {job_id}")
    finish(outcome, elapsed, run.as_json, render.writer(str(getattr(job.tracked, "output", "jsonl"))))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON.")
@handles_errors
def workers(as_json: bool) -> None:
    """List the running workers, with their concurrency and the tasks they have."""
    import json

    from orchestrator.discovery import list_workers
    from orchestrator.run import check_redis
    from workers.settings import get_settings

    settings = get_settings()
    check_redis(settings)
    found = list_workers(_app(), settings.queue)
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
        _fail(f"no worker is running on queue {settings.queue}. Start one with `fanout worker`.", EXIT_INFRA)


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
    import os

    from orchestrator.local import available_cores, worker_command
    from workers.settings import Settings

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
    "input_file",
    type=click.File("r"),
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
def map_command(
    function: str,
    input_file: Any,
    kwargs_json: str | None,
    reduce_spec: str | None,
    stream: bool,
    run: RunOptions,
) -> None:
    """Run the @fanout.task MODULE:FUNCTION over every item of --input, on the workers.

    Prints JSON Lines in input order: {"index": i, "result": r} or {"index": i, "error": "..."}.
    The workers must have the task: FANOUT_IMPORTS=MODULE (or `fanout worker --import MODULE`).
    """
    from orchestrator import jobs, render
    from orchestrator.inputs import load_task, parse_json_object, read_json_lines

    if stream and run.as_json:
        raise click.UsageError("--stream and --json cannot be combined")
    task = load_task(function, "MODULE:FUNCTION")
    reducer = load_task(reduce_spec, "--reduce") if reduce_spec else None
    kwargs = parse_json_object(kwargs_json, "--kwargs") if kwargs_json else None
    items = read_json_lines(input_file)
    if not items:
        raise click.UsageError("--input holds no items")
    work = jobs.prepare(task, items, kwargs=kwargs, reduce=reducer)
    if stream and not run.no_wait:
        _stream(work, run, reducer is not None)
    outcome, elapsed = execute(work.factory, work.total, work.batch_cap, run, task.name, work.requires)
    if reducer is not None and not run.as_json:
        finish(outcome, elapsed, run.as_json, render.write_reduced)
    finish(outcome, elapsed, run.as_json, render.write_jsonl)


def _stream(work: Any, run: RunOptions, reduced: bool) -> None:
    """``fanout map --stream``: a line per item as its batch finishes, then the summary; exits."""
    import time

    from orchestrator import jobs, render

    job, sent = jobs.start(
        work.factory, work.total, work.batch_cap, run.batch_size, work.requires, _app(), run.max_failures
    )
    failed = 0
    try:
        for index, value in job.as_completed(run.timeout):
            error = value.error if isinstance(value, jobs.Failure) else None
            failed += error is not None
            render.write_jsonl_line(index, None if error else value, error, sys.stdout)
    except KeyboardInterrupt:
        interrupted(job)
    outcome = job.wait(run.timeout)  # already done: one GET
    if reduced:
        render.write_reduced(outcome.data, sys.stdout)
    click.echo(render.summary(outcome.data, time.perf_counter() - sent), err=True)
    sys.exit(EXIT_ITEMS_FAILED if failed or not outcome.ok else EXIT_OK)


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
