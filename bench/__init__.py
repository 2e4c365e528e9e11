"""fanout's benchmark suite: ``python -m bench --help``.

Benchmarks measure speed; the test suite never does (no timed assertions there).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def out_option(help: str) -> Callable[[F], F]:
    """Every benchmark's ``--out DIRECTORY`` (default ``bench-results``); ``help`` says what goes there."""
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("bench-results"),
        show_default=True,
        help=help,
    )
