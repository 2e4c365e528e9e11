"""A job before it is sent: what runs over which items, checked, as one typed description.

The first step of the one send path (``prepare`` → ``send`` → ``publish``):

* :class:`JobSpec` says what a job runs and how: its task, the keyword
  arguments of every call, its reduce, its batch cap, where its results go.
  It is kept in the job's record, and ``fanout retry`` reads it back as it is.
* :func:`prepare` checks a spec and its items (InputError naming the culprit,
  before anything is sent) and gives the :class:`Plan`: the spec, the items,
  and the job's id.  It touches no network; the batch size is chosen when the
  plan is sent (orchestrator/send.py), from the workers that answer.

Items given as a list (or a range) are checked here.  Items given as an
iterator (a generator, or :class:`~orchestrator.stream.JsonLines`) are read up
to FANOUT_BY_REFERENCE_ITEMS here: if they end before, the job is an ordinary
one; if not, it is *streamed* (orchestrator/stream.py): sent by reference, its
items read, checked and spooled to its results location when it is sent,
never held in memory.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from workers import results, storage
from workers.batches import plain_range
from workers.core import DEFAULT_BATCH_SIZE, json_problem
from workers.errors import InputError
from workers.settings import get_settings

#: Batches per worker process that ``auto`` aims for, so no process idles at the end.
BATCHES_PER_PROCESS = 4

#: Items per batch: "auto" (or None) lets the send choose; a whole number fixes it.
BatchSize = int | Literal["auto"] | None


@dataclass(frozen=True)
class JobSpec:
    """What a job runs and how: everything needed to build it again (kept in its record)."""

    #: The fanout task each batch runs (a header task's name).
    task: str
    #: What the job is called in its outcome and in ``fanout status`` (the task's name unless set).
    shown_as: str = ""
    #: How the CLI prints the outcome: "double", "resize" or "jsonl".
    output: str = "jsonl"
    #: Keyword arguments of every call of the task (JSON, the same for the whole job).
    kwargs: dict[str, Any] | None = None
    #: A fanout task the chord callback runs on the merged outcome, with ``reduce_kwargs``.
    reduce: str | None = None
    reduce_kwargs: dict[str, Any] | None = None
    #: The reduce's (hard, soft) time limits, seconds, if it sets them.
    reduce_limits: tuple[int, int] | None = None
    #: The largest batch "auto" makes (the task's ``batch_size``); None: the task sets none,
    #: and "auto" sizes a streamed job's batches by time, an ordinary job's up to DEFAULT_BATCH_SIZE.
    batch_cap: int | None = DEFAULT_BATCH_SIZE
    #: The results location of a job sent by reference (None: FANOUT_RESULTS_URL or the default).
    results_root: str | None = None
    #: Set by :func:`prepare`: the job's directory in the results location when it is sent
    #: by reference (None: its items and results travel through Redis), and the location itself.
    where: str | None = None
    root: str | None = None
    #: Set by :func:`prepare` for a job over ``range(low, high)`` sent by reference: its bounds.
    range: tuple[int, int] | None = None
    #: A retry: the finished job whose failed items these are (the callback merges the outcomes)...
    retry_of: str | None = None
    #: ...and the job whose inputs they are (the first of a chain of retries).
    inputs_of: str | None = None
    #: The fanout task whose fold merges the batches' partials (workers/folding.py), if it folds.
    fold: str | None = None
    #: Set by :func:`prepare` for a streamed job: the items in each of its input chunks
    #: (``results.chunk_url``); its batches have sizes of their own (``keys.starts``).
    chunk: int | None = None

    def __post_init__(self) -> None:
        if not self.shown_as:
            object.__setattr__(self, "shown_as", self.task)
        if self.batch_cap is not None and self.batch_cap < 1:
            raise InputError(f"batch_cap must be at least 1, got {self.batch_cap}")

    @property
    def requires(self) -> tuple[str, ...]:
        """The fanout tasks a worker must have to run this job."""
        return (self.task, self.reduce) if self.reduce else (self.task,)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        """The spec kept in a job's record (InputError if it is not one)."""
        try:
            values = dict(data)
            for name in ("reduce_limits", "range"):
                if values.get(name) is not None:
                    low, high = values[name]
                    values[name] = (int(low), int(high))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"not a job spec ({exc}): was the job sent by another version of fanout?"
            ) from None


@dataclass(frozen=True)
class Plan:
    """A job checked and ready to send at any batch size: its spec, its items and its id."""

    job_id: str
    spec: JobSpec
    items: Sequence[Any] = field(repr=False)
    #: A retry: the indexes, in the job it retries, of these items (in order).
    indexes: tuple[int, ...] | None = field(default=None, repr=False)
    #: A streamed job's items, not read yet (``items`` is empty): read once, when it is sent.
    source: Iterable[Any] | None = field(default=None, repr=False)
    #: A streamed job's count of items, once its source has been read.
    count: int | None = None

    @property
    def streamed(self) -> bool:
        return self.spec.chunk is not None

    @property
    def total(self) -> int:
        return self.count if self.count is not None else len(self.items)

    @property
    def task(self) -> str:
        return self.spec.shown_as

    def batches(self, batch_size: int) -> int:
        return math.ceil(self.total / batch_size) if self.total else 0


def prepare(
    spec: JobSpec,
    items: Iterable[Any],
    *,
    job_id: str | None = None,
    by_reference: bool | None = None,
    retry_of: str | None = None,
    indexes: Sequence[int] | None = None,
) -> Plan:
    """Check ``spec`` and ``items`` (InputError naming what is wrong) and plan the job.

    ``items`` are JSON values; a range of integers stays a range (a big one
    travels by its bounds, never listed).  The job is sent by reference
    (items and results in the results location, not in Redis) when it has at
    least FANOUT_BY_REFERENCE_ITEMS items, or when ``by_reference`` says so.
    ``retry_of`` names a finished job whose items at ``indexes`` these are.
    An iterator of more than FANOUT_BY_REFERENCE_ITEMS items makes a streamed
    plan: its items are read (and checked) only when it is sent.
    """
    for name, value in (("kwargs", spec.kwargs), ("reduce_kwargs", spec.reduce_kwargs)):
        if value is not None and (not isinstance(value, dict) or json_problem(value)):
            raise InputError(f"{name} must be a dict of JSON values; nothing was sent")
    job_id = job_id or str(uuid.uuid4())
    settings = get_settings()
    if not isinstance(items, Sequence) and retry_of is None:
        from orchestrator.stream import JsonLines

        head, rest = _head(items, settings.by_reference_items)
        if rest is not None:  # more than a job held in memory: streamed
            root = storage.normalize(spec.results_root or settings.results_root)
            where = results.job_dir(root, job_id)
            streamed = replace(spec, where=where, root=root, range=None, retry_of=None, inputs_of=None)
            source = (
                JsonLines(itertools.chain(head, rest))
                if isinstance(items, JsonLines)
                else itertools.chain(head, rest)
            )
            return Plan(job_id, replace(streamed, chunk=CHUNK_ITEMS), (), source=source)
        items = items.parse(head) if isinstance(items, JsonLines) else head
    listed: Sequence[Any] = items if isinstance(items, range) else check_items(items)
    if not listed:
        raise InputError("no items: nothing to send")
    if by_reference is None:
        by_reference = len(listed) >= settings.by_reference_items
    if by_reference:
        root = storage.normalize(spec.results_root or settings.results_root)
        bounds = (listed.start, listed.stop) if plain_range(listed) else None  # type: ignore[attr-defined]
        spec = replace(spec, where=results.job_dir(root, job_id), root=root, range=bounds)
    else:
        spec = replace(spec, where=None, root=None, range=None)
    if retry_of is not None:
        spec = replace(spec, retry_of=retry_of, inputs_of=spec.inputs_of or retry_of)
        return Plan(job_id, spec, listed, tuple(indexes or ()))
    return Plan(job_id, replace(spec, retry_of=None, inputs_of=None), listed)


#: Items per input chunk of a streamed job: a file each in its results location.
CHUNK_ITEMS = 10_000


def _head(items: Iterable[Any], limit: int) -> tuple[list[Any], Iterator[Any] | None]:
    """The first ``limit`` items of ``items``, and the iterator of the rest if there is more
    (None if ``items`` ended within ``limit``)."""
    iterator = iter(items)
    head = list(itertools.islice(iterator, limit))
    if len(head) < limit:
        return head, None
    try:
        first = next(iterator)
    except StopIteration:
        return head, None
    return head, itertools.chain((first,), iterator)


def check_items(items: Iterable[Any], first: int = 0) -> list[Any]:
    """``items`` (input items ``first`` onwards) as a list, or InputError naming the first that
    JSON cannot carry."""
    listed = list(items)
    for index, item in enumerate(listed, first):
        problem = json_problem(item)
        if problem is not None:
            raise InputError(f"item {index} is not JSON: {problem}; nothing was sent")
    return listed


def auto_batch_size(total: int, processes: int, cap: int | None) -> int:
    """A batch size giving each worker process about BATCHES_PER_PROCESS batches, at most ``cap``
    (DEFAULT_BATCH_SIZE when the task sets none)."""
    if total <= 0:
        return 1
    cap = cap or DEFAULT_BATCH_SIZE
    return max(1, min(cap, math.ceil(total / (max(1, processes) * BATCHES_PER_PROCESS))))


def batch_size_of(value: BatchSize) -> int | None:
    """A fixed batch size from ``value``, or None for "auto" (InputError if it is neither)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"batch_size must be 'auto' or a whole number of at least 1, got {value!r}")
    return value


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
