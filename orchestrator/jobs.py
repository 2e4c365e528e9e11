"""Jobs as a library: send a fanout task over items, follow the job, read its outcome.

This is what ``import fanout`` exposes (:func:`submit`, :func:`map`,
:class:`Job`, :class:`Outcome`) and what every CLI command uses, so the
guarantees are the same from Python and from the shell.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

from celery import Celery

from orchestrator import run
from orchestrator.canvas import Plan, build
from orchestrator.status import StoredJob, UnknownJob, job_status
from workers import connections, fanin, keys, results
from workers.batches import unpack
from workers.core import FanoutTask, json_problem
from workers.errors import FanoutError, InputError

#: How long :meth:`Job.wait` and :func:`map` wait unless told, seconds.
DEFAULT_TIMEOUT = 600.0

BatchSize = int | Literal["auto"] | None


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


class ResultsTooLarge(FanoutError):
    """``Outcome.results`` of a job too big to hold as one list: iterate instead."""


class Outcome:
    """A finished job: results in input order (None where an item failed) and the failures by index.

    A job sent by reference (``by_reference``) keeps its results in the results
    location: ``iter_results()`` reads them in input order, one part at a time;
    ``results`` builds the list, for at most MAX_RESULTS_LIST items.
    """

    def __init__(self, data: fanin.Outcome) -> None:
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
        if not self.by_reference:
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


class Job:
    """A job sent to the workers.  Follow it from any process: ``Job.attach(job_id)``."""

    def __init__(self, tracked: run.Tracked, group_id: str, app: Celery | None = None) -> None:
        self.tracked = tracked
        self.group_id = group_id
        self.app = app or _app()

    @property
    def id(self) -> str:
        return self.tracked.job_id

    @property
    def total(self) -> int:
        return self.tracked.total

    @property
    def batches(self) -> int:
        return self.tracked.batches

    @property
    def batch_size(self) -> int:
        return self.tracked.batch_size

    @property
    def task(self) -> str:
        return str(getattr(self.tracked, "task", ""))

    @classmethod
    def attach(cls, job_id: str, app: Celery | None = None) -> Job:
        """The job ``job_id``, sent earlier from anywhere to this Redis (``UnknownJob`` if none)."""
        app = app or _app()
        stored = StoredJob.load(app, job_id)
        return cls(stored, stored.group_id, app)

    def progress(self) -> Progress:
        """How far the job got: O(1) in Redis."""
        status = job_status(self.app, self.id)
        return Progress(
            status.state, status.batches_done, self.batches, status.items_done, self.total, status.stopped
        )

    def wait(
        self, timeout: float = DEFAULT_TIMEOUT, progress: Callable[[int, int], None] | None = None
    ) -> Outcome:
        """The outcome, once the fan-in is done; ``RunTimeout`` after ``timeout`` seconds.

        ``progress(batches_done, batches)`` is called as batches finish.
        """
        return Outcome(run.wait(self.app, self.tracked, self.group_id, timeout, progress))

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
        for piece in run.parts_as_completed(self.app, self.tracked, self.group_id, timeout):
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
        return retry(self.id, batch_size, self.app)

    def __repr__(self) -> str:
        return f"<Job {self.id} ({self.task}): {self.total} items in {self.batches} batches>"


def cancel(app: Celery, group_id: str, terminate: bool = False) -> None:
    """Set the job's stop reason (a budget's, set first, stays); ``terminate`` interrupts its items too."""
    from workers.control import purge
    from workers.fanin import CANCELLED
    from workers.settings import get_settings

    settings = get_settings()
    connections.backend(app).set(keys.stop(group_id), CANCELLED, nx=True, ex=settings.result_expires)
    reason = (connections.backend(app).get(keys.stop(group_id)) or CANCELLED.encode()).decode()
    # Queued batches are taken off the queue and reported as cancelled at once...
    purge(app, settings.queue, group_id, reason)
    if terminate:  # ...running ones are interrupted...
        app.control.broadcast("fanout_interrupt", arguments={"group_id": group_id})
    # ...and the rest stop at their next item.


def retry(job_id: str, batch_size: BatchSize = "auto", app: Celery | None = None) -> Job:
    """:meth:`Job.retry_failed` for job ``job_id``."""
    app = app or _app()
    stored = StoredJob.load(app, job_id)
    status = job_status(app, job_id)
    if status.outcome is None:
        raise InputError(f"job {job_id} has not finished: wait for it, or cancel it, before retrying")
    outcome = status.outcome
    indexes = [int(e["index"]) for e in results.outcome_errors(outcome)]
    if not indexes:
        raise InputError(f"job {job_id} has no failed items to retry")
    spec = stored.spec
    inputs_of = str(spec.get("inputs_of") or job_id)  # a retry's items are its original job's
    if not spec.get("task"):
        raise InputError(f"job {job_id} cannot be retried: its record does not say how it was built")
    items = _inputs(app, inputs_of, indexes)
    limits = spec.get("reduce_limits")

    def factory(chosen: int) -> Plan:
        return build(
            str(spec["task"]),
            items,
            chosen,
            kwargs=spec.get("kwargs"),
            reduce=spec.get("reduce"),
            reduce_kwargs=spec.get("reduce_kwargs"),
            reduce_limits=(int(limits[0]), int(limits[1])) if limits else None,
            shown_as=spec.get("shown_as"),
            output=str(spec.get("output") or "jsonl"),
            retry_of=job_id,
            indexes=indexes,
            # A merged outcome the size of the old one: by reference if the old one was.
            by_reference=True if "ref" in outcome else None,
            results_root=str(spec["root"]) if spec.get("root") else None,
        )

    requires = [str(spec["task"])] + ([str(spec["reduce"])] if spec.get("reduce") else [])
    cap = int(spec.get("batch_cap") or stored.batch_size or 1)
    job, _ = start(factory, len(items), cap, _batch_size(batch_size), requires, app, inputs_of=inputs_of)
    return job


def _inputs(app: Celery, job_id: str, indexes: builtins.list[int]) -> builtins.list[Any]:
    """The input items at ``indexes`` (ascending) of job ``job_id``: from Redis, or its results location."""
    gone = InputError(
        f"the inputs of job {job_id} are no longer kept (FANOUT_RESULT_EXPIRES seconds): send the job again"
    )
    try:
        original = StoredJob.load(app, job_id)
    except UnknownJob:
        raise gone from None
    spec = original.spec
    if not spec.get("where"):
        raw = connections.backend(app).get(keys.inputs(job_id))
        if raw is None:
            raise gone
        inputs = unpack(raw)
        return [inputs[i] for i in indexes]
    if spec.get("range"):
        low, high = spec["range"]
        return [range(int(low), int(high))[i] for i in indexes]
    items: builtins.list[Any] = []
    size = original.batch_size
    chunk_start, chunk = -1, []
    try:
        for index in indexes:
            start = index // size * size
            if start != chunk_start:
                chunk_start, chunk = start, results.read_json(results.input_url(str(spec["where"]), start))
            items.append(chunk[index - start])
    except FileNotFoundError:
        raise gone from None
    return items


def _failure(failure: fanin.ItemFailure) -> Failure:
    return Failure(int(failure["index"]), failure["input"], str(failure["error"]))


def _unseen(
    piece: fanin.Part | fanin.Outcome, start: int, results: list[Any], yielded: bytearray
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


def check_items(items: Iterable[Any]) -> builtins.list[Any]:
    """``items`` as a list, or InputError naming the first that JSON cannot carry."""
    listed = builtins.list(items)
    for index, item in enumerate(listed):
        problem = json_problem(item)
        if problem is not None:
            raise InputError(f"item {index} is not JSON: {problem}; nothing was sent")
    return listed


def _task_of(value: Any, role: str) -> FanoutTask[Any, Any]:
    if not isinstance(value, FanoutTask):
        raise InputError(
            f"{role} must be a fanout task (decorate the function with @fanout.task), "
            f"got {type(value).__name__}"
        )
    return value


def start(
    factory: Callable[[int], Plan],
    total: int,
    batch_cap: int,
    batch_size: int | None,
    requires: Iterable[str],
    app: Celery | None = None,
    max_failures: int | str | None = None,
    inputs_of: str | None = None,
) -> tuple[Job, float]:
    """Check Redis and the workers, build the job at the chosen batch size, send it.

    ``max_failures`` (a count, or a percentage as "P%") stops the job once more
    items than that have failed.  Returns the job and ``time.perf_counter()``
    just before it was sent.
    """
    app = app or _app()
    budget = failure_budget(max_failures, total)

    def planned(size: int) -> Plan:
        plan = factory(size)
        spec = {**plan.spec, "batch_cap": batch_cap}
        if inputs_of:  # a retry: the items are a subset of another job's, read from there by
            # `fanout retry`; kept with this job too, so that a batch Redis drops can be sent again
            return replace(plan, spec={**spec, "inputs_of": inputs_of})
        return replace(plan, spec=spec)

    plan, group_id, sent = run.send_job(app, planned, total, batch_cap, batch_size, requires, budget)
    return Job(plan, group_id, app), sent


def failure_budget(value: int | str | None, total: int) -> int | None:
    """The most failures allowed: ``value`` items, or ``"P%"`` of ``total``; None for no limit."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return int(total * percent / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise InputError(f"max_failures must be a count (N) or a percentage (P%), got {value!r}") from None


def submit(
    task: FanoutTask[Any, Any],
    items: Iterable[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: FanoutTask[Any, Any] | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
    batch_size: BatchSize = "auto",
    max_failures: int | str | None = None,
) -> Job:
    """Send ``task`` over ``items`` (JSON values) and return at once with the :class:`Job`.

    ``kwargs`` go to every call, ``task(item, **kwargs)``.  With ``reduce``, a
    worker runs ``reduce(results, errors, **reduce_kwargs)`` on the merged
    outcome as the chord callback; its value is ``outcome.reduced``.
    ``batch_size`` is items per task: "auto" spreads the items over the
    workers' processes, at most the task's own ``batch_size``.  ``max_failures``
    (N, or "P%") cancels the job once more items than that have failed.
    """
    work = prepare(task, items, kwargs=kwargs, reduce=reduce, reduce_kwargs=reduce_kwargs)
    job, _ = start(
        work.factory,
        work.total,
        work.batch_cap,
        _batch_size(batch_size),
        work.requires,
        max_failures=max_failures,
    )
    return job


@dataclass(frozen=True)
class Work:
    """A task over items, checked and ready to build at any batch size (see :func:`start`)."""

    factory: Callable[[int], Plan]
    total: int
    batch_cap: int
    requires: tuple[str, ...]


def prepare(
    task: FanoutTask[Any, Any],
    items: Iterable[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: FanoutTask[Any, Any] | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
) -> Work:
    """Check ``task``, ``items`` and the keyword arguments (InputError naming what is wrong)."""
    definition = _task_of(task, "task")
    reducer = _task_of(reduce, "reduce") if reduce is not None else None
    # A range of integers is JSON as it is, and a big one goes by its bounds (never listed).
    listed: Sequence[Any] = items if isinstance(items, range) else check_items(items)
    for name, value in (("kwargs", kwargs), ("reduce_kwargs", reduce_kwargs)):
        if value is not None and (not isinstance(value, dict) or json_problem(value)):
            raise InputError(f"{name} must be a dict of JSON values; nothing was sent")
    if not listed:
        raise InputError("no items: nothing to send")
    reduce_limits = None
    if reducer is not None and reducer.time_limit and reducer.soft_time_limit:
        reduce_limits = (reducer.time_limit, reducer.soft_time_limit)

    def factory(chosen: int) -> Plan:
        return build(
            definition.name,
            listed,
            chosen,
            kwargs=kwargs,
            reduce=reducer.name if reducer else None,
            reduce_kwargs=reduce_kwargs,
            reduce_limits=reduce_limits,
        )

    requires = (definition.name, reducer.name) if reducer else (definition.name,)
    return Work(factory, len(listed), definition.batch_size, requires)


def map(
    task: FanoutTask[Any, Any],
    items: Iterable[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    reduce: FanoutTask[Any, Any] | None = None,
    reduce_kwargs: dict[str, Any] | None = None,
    batch_size: BatchSize = "auto",
    max_failures: int | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Outcome:
    """Run ``task`` over ``items`` on the workers and return the :class:`Outcome`, in input order.

    Blocks for at most ``timeout`` seconds (``RunTimeout`` after that: the job
    goes on, and ``Job.attach(id)`` finds it again).  A KeyboardInterrupt while
    it waits cancels the job, then goes on up.  See :func:`submit`.
    """
    job = submit(
        task,
        items,
        kwargs=kwargs,
        reduce=reduce,
        reduce_kwargs=reduce_kwargs,
        batch_size=batch_size,
        max_failures=max_failures,
    )
    try:
        return job.wait(timeout)
    except KeyboardInterrupt:
        job.cancel()
        raise


def _batch_size(value: BatchSize) -> int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"batch_size must be 'auto' or a whole number of at least 1, got {value!r}")
    return value
