"""Showing an outcome: one JSON document, or lines for a person."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from workers.fanin import Outcome


def as_document(outcome: Outcome, elapsed_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``--json`` document: results in input order, null where an item failed."""
    return {
        "job_id": outcome["job_id"],
        "task": outcome["task"],
        "total": outcome["total"],
        "succeeded": outcome["succeeded"],
        "failed": outcome["failed"],
        "results": outcome["results"],
        "errors": outcome["errors"],
        "elapsed_s": round(elapsed_s, 3),
        **(extra or {}),
    }


def write_json(document: dict[str, Any], out: IO[str]) -> None:
    json.dump(document, out, separators=(",", ":"))
    out.write("\n")


def summary(outcome: Outcome, elapsed_s: float) -> str:
    rate = outcome["total"] / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"{outcome['task']}: {outcome['total']} items, {outcome['succeeded']} succeeded, "
        f"{outcome['failed']} failed in {elapsed_s:.2f} s ({rate:,.0f} items/s), job {outcome['job_id']}"
    )


def write_errors(outcome: Outcome, err: IO[str], limit: int = 50) -> None:
    for failure in outcome["errors"][:limit]:
        err.write(f"failed item {failure['index']} ({failure['input']!r}): {failure['error']}\n")
    if len(outcome["errors"]) > limit:
        err.write(f"... and {len(outcome['errors']) - limit} more failed items (see --json)\n")


def write_double(outcome: Outcome, out: IO[str]) -> None:
    failed = {e["index"] for e in outcome["errors"]}
    out.writelines(
        "error\n" if index in failed else f"{value}\n" for index, value in enumerate(outcome["results"])
    )


def write_resize(outcome: Outcome, out: IO[str]) -> None:
    for record in outcome["results"]:
        if record is not None:
            out.write(
                f"{record['source']} -> {record['destination']} "
                f"({record['width']}x{record['height']}, {record['bytes']} bytes)\n"
            )


@contextmanager
def progress_bar(
    enabled: bool, label: str, total_items: int, batch_size: int
) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, fed with (batches done, batches in all)."""
    if not enabled:
        yield lambda done, batches: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total_items)

        def update(done: int, batches: int) -> None:
            items = total_items if done >= batches else min(total_items, done * batch_size)
            bar.update(task, completed=items)

        yield update
