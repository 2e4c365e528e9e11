"""Showing an outcome: one JSON document, or lines for a person."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain, repeat
from typing import IO, Any

from workers import results
from workers.fanin import OutcomeDoc


def as_document(outcome: OutcomeDoc, elapsed_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``--json`` document: results in input order, null where an item failed (all in memory)."""
    whole = results.materialize(outcome)
    return {
        **_head(whole),
        "results": whole["results"],
        "errors": whole["errors"],
        **_tail(outcome, elapsed_s, extra),
    }


def _head(outcome: OutcomeDoc) -> dict[str, Any]:
    return {key: outcome[key] for key in ("job_id", "task", "total", "succeeded", "failed")}


def _tail(outcome: OutcomeDoc, elapsed_s: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {
        **{key: outcome[key] for key in ("reduced", "reduce_error", "stopped", "retry_of") if key in outcome},
        "elapsed_s": round(elapsed_s, 3),
        **(extra or {}),
    }


def write_document(
    outcome: OutcomeDoc, elapsed_s: float, out: IO[str], extra: dict[str, Any] | None = None
) -> None:
    """The ``--json`` document of :func:`as_document`, written as the results are read (never all held)."""

    def dump(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    out.write(dump(_head(outcome))[:-1] + ',"results":[')
    first = True
    for _, values, _ in results.chunks(outcome):
        if values:
            out.write(dump(values)[1:-1] if first else "," + dump(values)[1:-1])
            first = False
    out.write('],"errors":[')
    out.write(",".join(dump(failure) for failure in results.outcome_errors(outcome)))
    tail = dump(_tail(outcome, elapsed_s, extra))
    out.write("]," + tail[1:] + "\n")


def write_json(document: dict[str, Any], out: IO[str]) -> None:
    json.dump(document, out, separators=(",", ":"))
    out.write("\n")


def summary(outcome: OutcomeDoc, elapsed_s: float) -> str:
    rate = outcome["total"] / elapsed_s if elapsed_s > 0 else 0.0
    line = (
        f"{outcome['task']}: {outcome['total']} items, {outcome['succeeded']} succeeded, "
        f"{outcome['failed']} failed in {elapsed_s:.2f} s ({rate:,.0f} items/s), job {outcome['job_id']}"
    )
    stopped = outcome.get("stopped")
    if stopped == "cancelled":
        line += f": CANCELLED ({sum(1 for e in outcome['errors'] if e['error'] == stopped)} items not run)"
    elif stopped:
        line += f": STOPPED, {stopped}"
    if outcome.get("retry_of"):
        line += f" (retry of job {outcome['retry_of']})"
    return line


def write_errors(outcome: OutcomeDoc, err: IO[str], limit: int = 50) -> None:
    if "reduce_error" in outcome:
        err.write(f"reduce failed: {outcome['reduce_error']}\n")
    shown = 0
    for failure in results.outcome_errors(outcome):
        if shown == limit:
            break
        err.write(f"failed item {failure['index']} ({failure['input']!r}): {failure['error']}\n")
        shown += 1
    if outcome["failed"] > shown:
        err.write(f"... and {outcome['failed'] - shown} more failed items (see --json)\n")


def write_double(outcome: OutcomeDoc, out: IO[str]) -> None:
    for first, values, failures in results.chunks(outcome):
        if not values:
            continue
        if not failures:  # the common case, a part at a time
            out.write("\n".join(map(str, values)) + "\n")
            continue
        out.writelines(
            "error\n" if first + offset in failures else f"{value}\n" for offset, value in enumerate(values)
        )


def write_resize(outcome: OutcomeDoc, out: IO[str]) -> None:
    for _, record, _ in results.rows(outcome):
        if record is not None:
            out.write(
                f"{record['source']} -> {record['destination']} "
                f"({record['width']}x{record['height']}, {record['bytes']} bytes)\n"
            )


#: On a terminal, a run prints this many result lines and says how to get the rest.
TERMINAL_LINES = 10


class Head:
    """A text stream that passes on the first ``limit`` lines and counts the ones it holds back."""

    def __init__(self, out: IO[str], limit: int) -> None:
        self.out = out
        self.left = limit
        self.held_back = 0

    def write(self, text: str) -> int:
        for line in text.splitlines(keepends=True):
            if self.left > 0:
                self.out.write(line)
                self.left -= line.endswith("\n")
            else:
                self.held_back += line.endswith("\n")
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)


def write_jsonl_line(index: int, result: Any, error: str | None, out: IO[str]) -> None:
    """One ``fanout map`` line: ``{"index": i, "result": r}``, or ``{"index": i, "error": "..."}``."""
    line = {"index": index, "error": error} if error is not None else {"index": index, "result": result}
    out.write(json.dumps(line, separators=(",", ":")) + "\n")


#: Lines ``write_jsonl`` builds and writes at once.
WRITE_LINES = 20_000
#: The result in JSON, as ``json.dumps(..., separators=(",", ":"))`` writes it (a str goes
#: straight to the C encoder).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def write_jsonl(outcome: OutcomeDoc, out: IO[str]) -> None:
    """Every item in input order, a JSON line each: a chunk (a part) in one write; for a fold,
    which keeps none, its value."""
    if outcome.get("folded"):
        write_reduced(outcome, out)
        return
    for first, values, failures in results.chunks(outcome):
        if failures:
            for offset, value in enumerate(values):
                failure = failures.get(first + offset)
                write_jsonl_line(first + offset, value, failure["error"] if failure else None, out)
            continue
        # No failure among them: the lines built by one join, with no dict, json.dumps or
        # format of their own (those cost 2 us a line, the most of a big job's client time).
        for low in range(0, len(values), WRITE_LINES):  # a slice at a time: the text stays a few MB
            some = values[low : low + WRITE_LINES]
            indexes = map(str, range(first + low, first + low + len(some)))
            encoded = map(_encode, some)
            pieces = zip(repeat('{"index":'), indexes, repeat(',"result":'), encoded, repeat("}\n"))
            out.write("".join(chain.from_iterable(pieces)))


def write_reduced(outcome: OutcomeDoc, out: IO[str]) -> None:
    """The reduce's value, as one JSON document (nothing if the reduce failed)."""
    if "reduced" in outcome:
        out.write(json.dumps(outcome["reduced"], separators=(",", ":")) + "\n")


#: How each kind of job prints its results (the kind is kept in the job's record).
WRITERS: dict[str, Callable[[OutcomeDoc, IO[str]], None]] = {
    "double": write_double,
    "resize": write_resize,
    "jsonl": write_jsonl,
}


def writer(kind: str) -> Callable[[OutcomeDoc, IO[str]], None]:
    return WRITERS.get(kind, write_jsonl)


@contextmanager
def progress_bar(
    enabled: bool, label: str, total_items: int, batch_size: int
) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, fed with (batches done, batches in all).

    ``batch_size`` 0: the batches have sizes of their own (a streamed job).

    Once every batch is done the fan-in is a phase of its own: the count stays
    full, the description says the callback is merging, and the clock runs on.
    """
    if not enabled:
        yield lambda done, batches: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
    from rich.text import Text

    class Clock(ProgressColumn):
        """Time since the start, still running once the count is full (rich's own column stops there)."""

        def render(self, task: Task) -> Text:
            seconds = int(task.elapsed or 0)
            return Text(
                f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed"
            )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Clock(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total_items)

        def update(done: int, batches: int) -> None:
            if done >= batches:
                bar.update(task, completed=total_items, description=f"{label}: fan-in, merging the results")
            elif batch_size:
                bar.update(task, completed=min(total_items, done * batch_size))
            else:  # batches of their own sizes (a streamed job): about in proportion
                bar.update(task, completed=total_items * done // max(1, batches))

        yield update
        bar.update(task, completed=total_items, description=f"{label}: done")
