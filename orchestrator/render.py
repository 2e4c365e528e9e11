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
        **{key: outcome[key] for key in ("reduced", "reduce_error") if key in outcome},
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
    if "reduce_error" in outcome:
        err.write(f"reduce failed: {outcome['reduce_error']}\n")
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


def write_jsonl_line(index: int, result: Any, error: str | None, out: IO[str]) -> None:
    """One ``fanout map`` line: ``{"index": i, "result": r}``, or ``{"index": i, "error": "..."}``."""
    line = {"index": index, "error": error} if error is not None else {"index": index, "result": result}
    out.write(json.dumps(line, separators=(",", ":")) + "\n")


def write_jsonl(outcome: Outcome, out: IO[str]) -> None:
    """Every item in input order, a JSON line each."""
    failed = {e["index"]: e["error"] for e in outcome["errors"]}
    for index, value in enumerate(outcome["results"]):
        write_jsonl_line(index, value, failed.get(index), out)


def write_reduced(outcome: Outcome, out: IO[str]) -> None:
    """The reduce's value, as one JSON document (nothing if the reduce failed)."""
    if "reduced" in outcome:
        out.write(json.dumps(outcome["reduced"], separators=(",", ":")) + "\n")


#: How each kind of job prints its results (the kind is kept in the job's record).
WRITERS: dict[str, Callable[[Outcome, IO[str]], None]] = {
    "double": write_double,
    "resize": write_resize,
    "jsonl": write_jsonl,
}


def writer(kind: str) -> Callable[[Outcome, IO[str]], None]:
    return WRITERS.get(kind, write_jsonl)


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
