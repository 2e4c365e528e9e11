"""Running a job from the command line: send it, follow it, show its outcome.

Each step returns; the command exits once, with the code the last step gave.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from orchestrator import render
from orchestrator.cli.options import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_OK, RunOptions, error
from orchestrator.jobs import Failure, Job
from orchestrator.plan import Plan
from orchestrator.send import check_redis, send
from workers.app import app
from workers.errors import FanoutError
from workers.fanin import OutcomeDoc
from workers.results import failed_for
from workers.settings import get_settings

#: How long Ctrl-C waits for the cancelled job's counts before leaving, seconds.
CANCEL_WAIT_S = 30.0

Writer = Callable[[OutcomeDoc, Any], None]  # writes to a file, or to render.Head


@dataclass(frozen=True)
class Ran:
    """What running a job came to: its outcome and the seconds it took, or the exit code it
    ended with before it had one (Ctrl-C, ``--no-wait``)."""

    outcome: OutcomeDoc | None = None
    elapsed: float = 0.0
    code: int = EXIT_OK


def attach(job_id: str) -> Job:
    """Job ``job_id``, once Redis answers (InfrastructureError if not, UnknownJob if no such job)."""
    check_redis(get_settings())
    return Job.attach(job_id, app)


def run_job(plan: Plan, run: RunOptions, label: str) -> Ran:
    """Send ``plan`` and wait for it; with ``--no-wait``, print its id once it is sent.

    Ctrl-C while sending cancels what was sent; Ctrl-C while waiting cancels the
    job (see :func:`interrupted`).
    """
    started = time.perf_counter()
    job = send_job(plan, run)
    if job is None:
        return Ran(code=EXIT_INTERRUPTED)
    if run.no_wait:
        announce(job, run.as_json)
        return Ran(code=EXIT_OK)
    return wait(job, run, label, started)


def send_job(plan: Plan, run: RunOptions) -> Job | None:
    """The job sent, or None if Ctrl-C interrupted the send (what was sent is cancelled)."""
    try:
        return send(plan, batch_size=run.batch_size, max_failures=run.max_failures)
    except KeyboardInterrupt:
        click.echo("\ninterrupted while sending: whatever part of the job was sent is cancelled", err=True)
        return None


def wait(job: Job, run: RunOptions, label: str, started: float) -> Ran:
    """Wait for ``job`` with a progress bar; Ctrl-C cancels it."""
    try:
        with render.progress_bar(run.show_progress, label, job.total, job.shown_batch_size) as update:
            outcome = job.wait(run.timeout, update)
    except KeyboardInterrupt:
        return Ran(code=interrupted(job))
    return Ran(outcome.data, time.perf_counter() - started)


def interrupted(job: Job) -> int:
    """Ctrl-C on a waiting run: cancel the job, wait (briefly) for its counts; EXIT_INTERRUPTED.

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
        return EXIT_INTERRUPTED
    except FanoutError as exc:
        error(str(exc))
        return EXIT_INTERRUPTED
    click.echo(f"job {job.id} cancelled: {counts(outcome)}", err=True)
    return EXIT_INTERRUPTED


def counts(outcome: OutcomeDoc) -> str:
    """``N done, M cancelled, K failed``: the cancelled failed for the reason the job stopped."""
    cancelled = failed_for(outcome, outcome.get("stopped"))
    return f"{outcome['succeeded']} done, {cancelled} cancelled, {outcome['failed'] - cancelled} failed"


def announce(job: Job, as_json: bool) -> None:
    """What ``--no-wait`` prints: the job id on stdout, how to follow it on stderr."""
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


def exit_code(outcome: OutcomeDoc) -> int:
    """0 when every item (and the reduce, if any) succeeded, else 1."""
    return EXIT_ITEMS_FAILED if outcome["failed"] or outcome.get("reduce_error") else EXIT_OK


def show(
    outcome: OutcomeDoc,
    elapsed: float,
    as_json: bool,
    write_text: Writer,
    extra: dict[str, Any] | None = None,
) -> int:
    """Print the outcome (``--json``: one document; a terminal: the first lines); return the exit code."""
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
    return exit_code(outcome)


def stream(plan: Plan, run: RunOptions, reduced: bool) -> int:
    """``fanout map --stream``: a line per item as its batch finishes, then the summary."""
    started = time.perf_counter()
    job = send_job(plan, run)
    if job is None:
        return EXIT_INTERRUPTED
    failed = 0
    try:
        for index, value in job.as_completed(run.timeout):
            problem = value.error if isinstance(value, Failure) else None
            failed += problem is not None
            render.write_jsonl_line(index, None if problem else value, problem, sys.stdout)
    except KeyboardInterrupt:
        return interrupted(job)
    outcome = job.wait(run.timeout)  # already done: one GET
    if reduced:
        render.write_reduced(outcome.data, sys.stdout)
    click.echo(render.summary(outcome.data, time.perf_counter() - started), err=True)
    return EXIT_ITEMS_FAILED if failed or not outcome.ok else EXIT_OK
