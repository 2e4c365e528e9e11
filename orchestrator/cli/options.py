"""What the ``fanout`` commands share: exit codes, the options of a run, and errors turned into codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from orchestrator.jobs import DEFAULT_TIMEOUT
from workers.errors import ConfigError, InfrastructureError, InputError, UnknownJob

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
#: Interrupted (Ctrl-C): the job was cancelled, or left running after a second Ctrl-C.
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def error(message: str) -> None:
    """The one line an error gets on stderr."""
    click.echo(f"fanout: error: {message}", err=True)


def handles_errors(func: F) -> F:
    """Turn fanout's errors into a one-line message and the exit code that means it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        except ConfigError as exc:
            error(f"configuration: {exc}")
            code = EXIT_USAGE
        except UnknownJob as exc:
            error(str(exc))
            code = EXIT_USAGE
        except InfrastructureError as exc:
            error(str(exc))
            code = EXIT_INFRA
        click.get_current_context().exit(code)

    return wrapper  # type: ignore[return-value]


class BatchSizeParam(click.ParamType):  # type: ignore[type-arg]
    """``--batch-size auto|N``: None for auto, else a whole number of at least 1."""

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


def timeout_option(default: float, what: str) -> Callable[[F], F]:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help=f"Seconds {what}.",
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def show_progress(progress: bool | None) -> bool:
    """``--progress/--no-progress``, or when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


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
        return show_progress(self.progress)


def run_options(func: F) -> F:
    """Add the options of a command that runs a job; the command gets them as ``run: RunOptions``."""
    options = [
        json_option,
        timeout_option(DEFAULT_TIMEOUT, "to wait for the whole run"),
        click.option(
            "--batch-size",
            type=BatchSizeParam(),
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
