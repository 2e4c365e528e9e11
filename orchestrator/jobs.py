"""Jobs as a library: send a fanout task over items, follow the job, read its outcome.

This is what ``import fanout`` exposes (:func:`submit`, :func:`map`,
:class:`Job`, :class:`Outcome`) and what every CLI command uses, so the
guarantees are the same from Python and from the shell.
"""

from __future__ import annotations

import builtins
import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from celery import Celery

from orchestrator import follow
from orchestrator.plan import BatchSize, JobSpec
from orchestrator.status import Status, job_status
from workers import connections, fanin, keys, results
from workers.backend import replicated
from workers.batches import unpack
from workers.errors import InputError, ResultsTooLarge, UnknownJob
from workers.fanin import CANCELLED
from workers.jobindex import index_job
from workers.purge import purge
from workers.settings import get_settings

#: How long :meth:`Job.wait` and :func:`fanout.map` wait unless told, seconds.
DEFAULT_TIMEOUT = 600.0


def _app() -> Celery:
    from workers.app import app

    return app


@dataclass(frozen=True)
class Failure:
    """One item that failed: its index in the input, the input (or its label), and why."""

    index: int
    input: Any
    error: str


#: The most values ``Outcome.results`` puts in one list; a bigger job's results are
#: read with ``Outcome.iter_results()`` (or ``Job.results()``), one part at a time.
MAX_RESULTS_LIST = 1_000_000


class Outcome:
    """A finished job: results in input order (None where an item failed) and the failures by index.

    A job sent by reference (``by_reference``) keeps its results in the results
    location: ``iter_results()`` reads them in input order, one part at a time;
    ``results`` builds the list, for at most MAX_RESULTS_LIST items.
    """

    def __init__(self, data: fanin.OutcomeDoc) -> None:
        self.data = data

    job_id = property(lambda self: self.data["job_id"])
    task = property(lambda self: self.data["task"])
    total = property(lambda self: self.data["total"])
    succeeded = property(lambda self: self.data["succeeded"])
    failed = property(lambda self: self.data["failed"])
    #: The reduce's return value (None without a reduce, or if it failed: see ``reduce_error``).
    reduced = property(lambda self: self.data.get("reduced"))
    reduce_error = property(lambda self: self.data.get("reduce_error"))

    @property
    def by_reference(self) -> bool:
        """Whether the results are in the results location (``ref``) rather than in this object."""
        return "ref" in self.data

    @cached_property
    def results(self) -> builtins.list[Any]:
        """Every result in input order, None where the item failed (see MAX_RESULTS_LIST)."""
        if not self.by_reference or self.data.get("folded"):  # a fold keeps no results: empty
            return self.data["results"]
        if self.total > MAX_RESULTS_LIST:
            raise ResultsTooLarge(
                f"job {self.job_id} has {self.total:,} results, more than one list holds here "
                f"({MAX_RESULTS_LIST:,}): iterate over outcome.iter_results() or job.results()"
            )
        return builtins.list(self.iter_results())

    def iter_results(self) -> Iterator[Any]:
        """Every result in input order (None where the item failed), read as it goes."""
        return (value for _, value, _ in results.rows(self.data))

    @cached_property
    def errors(self) -> builtins.list[Failure]:
        return [
            Failure(int(e["index"]), e["input"], str(e["error"])) for e in results.outcome_errors(self.data)
        ]

    @property
    def ok(self) -> bool:
        """Every item succeeded (and the reduce, if any)."""
        return not self.failed and "reduce_error" not in self.data

    def __repr__(self) -> str:
        return (
            f"<Outcome job {self.job_id} ({self.task}): {self.succeeded} of {self.total} succeeded, "
            f"{self.failed} failed>"
        )


@dataclass(frozen=True)
class Progress:
    """Where a job stands: ``state`` is "running" or Celery's final state of its fan-in (SUCCESS)."""

    state: str
    batches_done: int
    batches: int
    items_done: int
    total: int
    #: Why the job was stopped ("cancelled", "failure budget exceeded: ..."), if it was.
    stopped: str | None = None


@dataclass(frozen=True)
class Job:
    """A job sent to the workers, as its record in Redis says.  Follow it from any process:
    ``Job.attach(job_id)``."""

    job_id: str
    #: The chord's group id: what its header tasks, its stop reason and its count are keyed by.
    group_id: str
    spec: JobSpec
    total: int
    batch_size: int
    batches: int
    #: When it was sent (``time.time()``), if known.
    sent_at: float | None = None
    #: The host it was sent from (``fanout jobs`` shows it).
    host: str = field(default_factory=socket.gethostname, compare=False)
    #: How a worker sends a batch of it again if Redis drops it (workers/healing.py), if it can.
    heal: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    app: Celery = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.app is None:
            object.__setattr__(self, "app", _app())

    @property
    def id(self) -> str:
        return self.job_id

    @property
    def shown_batch_size(self) -> int:
        """Items per batch, for a progress bar: 0 where batches have sizes of their own (streamed)."""
        return 0 if self.spec.chunk else self.batch_size

    @property
    def task(self) -> str:
        """What the job is called in its outcome and in ``fanout status``."""
        return self.spec.shown_as

    @property
    def output(self) -> str:
        """How the CLI prints its outcome: "double", "resize" or "jsonl"."""
        return self.spec.output

    def save(self, expires: int) -> None:
        """Write this record, which the workers' healer watches until its fan-in is done
        (workers/healing.py) and `fanout jobs` lists (workers/jobindex.py); one round trip,
        then the wait for replicas that FANOUT_WAIT_REPLICAS asks for."""
        client = connections.backend(self.app)
        sent_at = self.sent_at or time.time()
        with client.pipeline(transaction=False) as pipe:
            pipe.set(keys.job(self.job_id), json.dumps(self.to_record()), ex=expires)
            pipe.zadd(keys.ACTIVE, {self.job_id: sent_at})
            index_job(pipe, self.job_id, sent_at, expires)
            pipe.execute()
        replicated(client, f"job {self.job_id}'s record and inputs")

    def to_record(self) -> dict[str, Any]:
        """The job's record, as kept in Redis (read by ``fanout status``, the healer, ``fanout retry``)."""
        record = {
            "job_id": self.job_id,
            "group_id": self.group_id,
            "task": self.task,
            "total": self.total,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "output": self.output,
            "spec": self.spec.to_json(),
            "sent_at": self.sent_at,
            "host": self.host,
        }
        if self.heal is not None:
            record["heal"] = self.heal
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], app: Celery | None = None) -> Job:
        spec = dict(record.get("spec") or {})
        spec.setdefault("task", record["task"])
        spec.setdefault("shown_as", record["task"])
        spec.setdefault("output", record.get("output") or "jsonl")
        return cls(
            job_id=str(record["job_id"]),
            group_id=str(record["group_id"]),
            spec=JobSpec.from_json(spec),
            total=int(record["total"]),
            batch_size=int(record["batch_size"]),
            batches=int(record["batches"]),
            sent_at=record.get("sent_at"),
            host=str(record.get("host") or ""),
            heal=record.get("heal"),
            app=app or _app(),
        )

    @classmethod
    def attach(cls, job_id: str, app: Celery | None = None) -> Job:
        """The job ``job_id``, sent earlier from anywhere to this Redis (``UnknownJob`` if none)."""
        app = app or _app()
        record = load_record(app, job_id)
        if record is None:
            raise UnknownJob(
                f"no job {job_id} in Redis: not sent to this Redis (FANOUT_REDIS_URL), "
                "or its results expired (FANOUT_RESULT_EXPIRES)"
            )
        return cls.from_record(record, app)

    def status(self) -> Status:
        """Where the job stands now: O(1) in Redis."""
        return job_status(self)

    def progress(self) -> Progress:
        """How far the job got: O(1) in Redis."""
        status = self.status()
        return Progress(
            status.state, status.batches_done, self.batches, status.items_done, self.total, status.stopped
        )

    def wait(
        self, timeout: float = DEFAULT_TIMEOUT, progress: Callable[[int, int], None] | None = None
    ) -> Outcome:
        """The outcome, once the fan-in is done; ``RunTimeout`` after ``timeout`` seconds.

        ``progress(batches_done, batches)`` is called as batches finish.
        """
        return Outcome(follow.wait(self.app, self, timeout, progress))

    def results(self, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Any]:
        """Every result in input order (None where an item failed), once the job is done.

        Read from the results location part by part, so a job of any size fits.
        """
        return self.wait(timeout).iter_results()

    def as_completed(self, timeout: float = DEFAULT_TIMEOUT) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` for every item, each once, as its batch finishes (not in input order).

        A failed item yields ``(index, Failure)``.  Items whose batches finished
        before the first look, or that were lost, come with the final outcome.
        """
        yielded = bytearray(self.total)
        for piece in follow.parts_as_completed(self.app, self, timeout):
            if "job_id" in piece and "ref" in piece:  # the final outcome, kept by reference
                for index, value, failure in results.rows(piece):  # type: ignore[arg-type]
                    if not yielded[index]:
                        yielded[index] = 1
                        yield index, _failure(failure) if failure else value
            elif "job_id" in piece:  # the final outcome
                yield from _unseen(piece, 0, piece["results"], yielded)
            else:
                ref: Any = piece
                part = results.read_part(ref["url"]) if results.is_ref(ref) else piece
                yield from _unseen(part, part["start"], part["results"], yielded)

    def cancel(self, terminate: bool = False) -> None:
        """Stop the job: queued batches never start, running ones stop at their next item.

        With ``terminate``, the items running now are interrupted too.  The fan-in
        still completes: finished items keep their results, every other item
        fails with ``cancelled``.  Works from any process, on a job sent from anywhere.
        """
        cancel(self.app, self.group_id, terminate)

    def retry_failed(self, batch_size: BatchSize = "auto") -> Job:
        """Send this finished job's failed and cancelled items again, as a new job linked to this one.

        The new job's outcome is this one's with the retried items' new results
        in their places, in the original input order.
        """
        from orchestrator.send import retry  # sending builds on this module

        return retry(self.job_id, batch_size, self.app)

    def items_at(self, indexes: builtins.list[int]) -> builtins.list[Any]:
        """This job's input items at ``indexes`` (ascending): from Redis, or its results location.

        InputError once they are no longer kept (``fanout retry`` needs them).
        """
        gone = InputError(
            f"the inputs of job {self.job_id} are no longer kept (FANOUT_RESULT_EXPIRES seconds): "
            "send the job again"
        )
        spec = self.spec
        if spec.where is None:
            raw = connections.backend(self.app).get(keys.inputs(self.job_id))
            if raw is None:
                raise gone
            kept = unpack(raw)
            return [kept[i] for i in indexes]
        if spec.range is not None:
            return [range(*spec.range)[i] for i in indexes]
        items: builtins.list[Any] = []
        size = spec.chunk or self.batch_size
        chunk_start, chunk = -1, []
        try:
            for index in indexes:
                start = index // size * size
                if start != chunk_start:
                    url = (
                        results.chunk_url(spec.where, start // size)
                        if spec.chunk
                        else results.input_url(spec.where, start)
                    )
                    chunk_start, chunk = start, results.read_json(url)
                items.append(chunk[index - start])
        except FileNotFoundError:
            raise gone from None
        return items

    def __repr__(self) -> str:
        return f"<Job {self.job_id} ({self.task}): {self.total} items in {self.batches} batches>"


def load_record(app: Celery, job_id: str) -> dict[str, Any] | None:
    """Job ``job_id``'s record in Redis, or None."""
    raw = connections.backend(app).get(keys.job(job_id))
    return json.loads(raw) if raw else None


def cancel(app: Celery, group_id: str, terminate: bool = False) -> None:
    """Set the job's stop reason (a budget's, set first, stays); ``terminate`` interrupts its items too."""
    settings = get_settings()
    connections.backend(app).set(keys.stop(group_id), CANCELLED, nx=True, ex=settings.result_expires)
    reason = (connections.backend(app).get(keys.stop(group_id)) or CANCELLED.encode()).decode()
    # Queued batches are taken off the queue and reported as cancelled at once...
    purge(app, settings.queue, group_id, reason)
    if terminate:  # ...running ones are interrupted...
        app.control.broadcast("fanout_interrupt", arguments={"group_id": group_id})
    # ...and the rest stop at their next item.


def _failure(failure: fanin.ItemFailure) -> Failure:
    return Failure(int(failure["index"]), failure["input"], str(failure["error"]))


def _unseen(
    piece: fanin.Part | fanin.OutcomeDoc, start: int, results: list[Any], yielded: bytearray
) -> Iterator[tuple[int, Any]]:
    failures = {int(e["index"]): e for e in piece["errors"]}
    for offset, value in enumerate(results):
        index = start + offset
        if not 0 <= index < len(yielded) or yielded[index]:
            continue
        yielded[index] = 1
        failure = failures.get(index)
        if failure is not None:
            yield index, Failure(index, failure["input"], str(failure["error"]))
        else:
            yield index, value
