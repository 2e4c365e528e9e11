"""fanout tasks: a typed function, fanned out in batches by one generic header task.

``@task`` turns a plain function of one item into a :class:`FanoutTask`.  It
stays a plain function (calling it runs it here), and it registers one Celery
task on the one app under the function's name.  That Celery task is the
*header* of every job of this function: it runs one batch of consecutive
items and returns a :class:`~workers.fanin.Part`.  Every job differs only in
its work; the policy is declared once on the decorator and applied here:

* each item runs once, its exception becomes that item's error (type and
  message; the traceback goes to the worker log, once, with the item's index),
  never the batch's; every line about a batch names its job, items and count,
  and a line when it finishes gives its seconds (:mod:`workers.logs`);
* a result that is not JSON becomes that item's error, naming its type;
* exceptions in ``retry_on`` retry that item in place, ``retries`` times at
  most, with exponential backoff; the last attempt's error is the one reported;
* the soft time limit ends the batch at the item it interrupts; the items done
  keep their results, the rest fail with the reason; before the first item it
  puts the batch back on the queue (only a slow Redis can use up the limit there),
  and once the last is done it is held (:mod:`workers.softlimit`): a soft limit
  never fails the chord, wherever in the batch it fires;
* a pool process killed mid-batch (OOM, hard time limit, kill -9) puts the
  batch back on the queue, and an item that kills its process again and again
  is failed instead of run forever (:mod:`workers.attempts`).

The same decorator makes a *reduce* function: ``reduce(results, errors, **kwargs)``,
run once on a worker by the chord callback, ``fanout.collect``.  A task declared with
``fold=Fold(...)`` folds instead (:mod:`workers.folding`): each batch reports one
partial and its failures, and the callback merges the partials one at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar, overload

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from workers import batchio, connections, logs, metrics, softlimit
from workers.app import app, soft_limit
from workers.attempts import RedisAttemptLog, run_counted
from workers.batches import batch_items
from workers.control import JobControl
from workers.errors import BadTask, ItemError, JobStopped, NotJSON
from workers.fanin import Part, describe, fail_batch
from workers.folding import Fold, fold_part
from workers.settings import get_settings

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: The most items one batch of an ordinary job holds under "auto" when the task's decorator
#: sets no ``batch_size``: small enough that a batch of items taking a tenth of a second each
#: ends well within the default soft time limit (20 s).  A streamed job's "auto" batches are
#: sized by time instead (orchestrator/stream.py), up to the decorator's ``batch_size`` if set.
DEFAULT_BATCH_SIZE = 100
#: The longest pause between two attempts of one item, seconds.
MAX_BACKOFF_S = 30.0
#: The header tasks' request class: a hard time limit requeues the batch instead of failing the chord.
HEADER_REQUEST = "workers.attempts:HeaderRequest"

_JSON_SCALARS = (int, float, str, bool, type(None))


def json_problem(value: Any) -> str | None:
    """Why ``value`` is not JSON, or None if it is (ints, floats, strings, bools, None, lists, dicts)."""
    if type(value) in _JSON_SCALARS:
        return None
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        return f"{type(value).__name__} is not JSON ({exc})"
    return None


def default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname``; for a script run as ``__main__``, its file's name stands for the module."""
    module = fn.__module__
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        path = getattr(main, "__file__", None)
        module = spec.name if spec is not None else Path(path).stem if path else module
    return f"{module}.{fn.__qualname__}"


class FanoutTask(Generic[P, R]):
    """A function that fanout can fan out: ``fanout.map(task, items)``.

    Calling it calls the function, here and now.  ``name`` is what workers know
    it by; a worker has it once the module defining it is imported there
    (``FANOUT_IMPORTS``).
    """

    def __init__(
        self,
        fn: Callable[P, R],
        name: str,
        batch_size: int | None,
        time_limit: int | None,
        retries: int,
        retry_on: tuple[type[BaseException], ...],
        backoff: float,
        label: Callable[[Any], Any] | None,
        fold: Fold[Any] | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.batch_size = batch_size
        self.time_limit = time_limit
        self.retries = retries
        self.retry_on = retry_on
        self.backoff = backoff
        self.label: Callable[[Any], Any] = label or (lambda item: item)
        #: How this task's results are folded, batch by batch, instead of returned one by one.
        self.fold = fold
        functools.update_wrapper(self, fn)
        self.celery_task = _register(self)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<fanout task {self.name}>"

    @property
    def soft_time_limit(self) -> int | None:
        return soft_limit(self.time_limit) if self.time_limit else None

    def run_item(self, item: Any, kwargs: dict[str, Any], index: int | None = None) -> Any:
        """One item (input ``index``), with this task's retries; its result checked to be JSON.

        A failure's traceback is logged here, once, with the item's index (the batch's
        lines name the job: :mod:`workers.logs`); the part carries only its reason.
        """
        attempt = 0
        while True:
            try:
                result = self.fn(item, **kwargs)
            except self.retry_on as exc:
                if attempt >= self.retries:
                    logger.warning(
                        "item %s (%r) raised on its last attempt",
                        index, self.label(item), exc_info=True, extra=logs.about_item(index),
                    )  # fmt: skip
                    raise
                pause = min(self.backoff * 2**attempt, MAX_BACKOFF_S)
                attempt += 1
                logger.warning(
                    "item %s (%r) failed (%s); attempt %d of %d in %.1f s",
                    index, self.label(item), exc, attempt + 1, self.retries + 1, pause,
                    extra=logs.about_item(index),
                )  # fmt: skip
                time.sleep(pause)
                continue
            except (ItemError, SoftTimeLimitExceeded):
                raise
            except Exception:
                logger.warning(
                    "item %s (%r) raised",
                    index,
                    self.label(item),
                    exc_info=True,
                    extra=logs.about_item(index),
                )
                raise
            problem = json_problem(result) if self.fold is None else None  # a fold's results stay here
            if problem is not None:
                raise NotJSON(str(self.label(item)), f"result: {problem}")
            return result

    def run_batch(self, task: Task, start: int, items: list[Any], kwargs: dict[str, Any]) -> Part:
        """The header task's work: ``items`` (input items ``start`` onwards).

        Counted for poison items, stopped by the soft time limit or by the job's
        stop reason (cancel, failure budget), its failures counted against the budget.
        """
        client = connections.backend(task.app)
        expires = get_settings().result_expires
        group = task.request.group
        limits = task.request.timelimit or (None, None)
        soft = limits[1] or task.soft_time_limit or app.conf.task_soft_time_limit
        control: JobControl | None = None
        began = time.monotonic()
        raised: Counter[str] = Counter()  # the items' exceptions by class, for the exporter

        def stopped(exc: BaseException) -> tuple[str, str]:
            reason = exc.reason if isinstance(exc, JobStopped) else control.stop_reason() if control else None
            if reason is not None:  # cancelled (--terminate interrupts an item the same way)
                return reason, reason
            return (
                f"the batch reached its soft time limit ({soft} s) while it ran",
                f"not started: the batch reached its soft time limit ({soft} s) first",
            )

        def work(numbered: tuple[int, Any]) -> Any:
            if control is not None:
                control.check()
            try:
                return self.run_item(numbered[1], kwargs, numbered[0])
            except (SoftTimeLimitExceeded, JobStopped):
                raise
            except Exception as exc:
                raised[type(exc).__name__] += 1
                raise

        def count(part: Part, reason: str | None, seconds: float | None) -> None:
            """The exporter's counts of ``part``, sent with the batch's last writes (workers/metrics.py)."""
            counts = metrics.batch_counts(part, reason, raised)
            metrics.count_at_end(task.request, self.name, group, counts, seconds, expires)

        def counted(part: Part, reason: str) -> Part:  # a stopped batch: not run, its items cancelled
            count(part, reason, None)
            return part

        task_id = str(task.request.id)
        try:
            # Inside the try: the soft limit can fire here too (a Redis restart makes
            # these reads wait), and then the batch's items fail with the reason.
            started = batchio.start_batch(client, task_id, str(group) if group else None, expires)
            log = RedisAttemptLog(client, task_id, expires, runs=started.runs)
            control = JobControl(client, str(group), expires, started.stop, started.budget) if group else None
            if control is not None and control.reason is not None:  # queued when the job stopped
                batchio.batch_end(task.request).add("dropping the batch's run count", log.drop_counts)
                return counted(fail_batch(start, items, control.reason, self.label), control.reason)
            part = run_counted(
                work,
                start,
                list(enumerate(items, start)),  # each item with its index, for its log lines
                log,
                lambda numbered: self.label(numbered[1]),
                stop_on=(SoftTimeLimitExceeded, JobStopped),
                stopped=stopped,
            )
        except SoftTimeLimitExceeded:  # before the first item: nothing ran
            reason = control.stop_reason() if control is not None else None
            if reason is not None:  # cancelled (--terminate) or over budget: the items fail with it
                return counted(fail_batch(start, items, reason, self.label), reason)
            # Redis took the whole soft limit to answer (a restart): the batch goes back to the
            # queue and runs once it answers, as if it had never been taken.
            logger.warning(
                "soft time limit (%s s) reached before the first item of batch %s (Redis slow to "
                "answer?): putting the batch back on the queue",
                soft, task.request.id,
            )  # fmt: skip
            raise Reject("soft time limit before the first item", requeue=True) from None
        # The items are done: from here to the chord's join, the soft limit has nothing
        # left to stop, and raised it would fail the whole chord (workers/softlimit.py).
        softlimit.hold("reporting a finished batch")
        # The batch's last writes go in one round trip with its chord report (workers/batchio.py).
        end = batchio.batch_end(task.request)
        # The batch ran to its end: its run counts are needed no more (a copy delivered
        # later runs as a first run, safely).  Not left behind, one key per batch, for a day.
        end.add("dropping the batch's run counts", log.drop_counts)
        reason = control.reason if control is not None else None
        # The exporter's counts go in the same round trip (workers/metrics.py).
        count(part, reason, time.monotonic() - began)
        if control is not None:
            control.count_failures(end, sum(1 for e in part["errors"] if e["error"] != reason))
        return part

    def reduce(self, results: list[Any], errors: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run as a reduce step: ``fn(results, errors, **kwargs)``, its value checked to be JSON."""
        reduce: Callable[..., Any] = self.fn
        value = reduce(results, errors, **kwargs)
        problem = json_problem(value)
        if problem is not None:
            raise NotJSON(self.name, f"reduce value: {problem}")
        return value


def _offer(task: Task, fold: Fold[Any], where: str, ref: dict[str, Any]) -> None:
    """Offer a folded part to its job's running total; the lock of a round outlives the task's hard limit."""
    from workers import running

    hard = (task.request.timelimit or (None, None))[0] or task.time_limit or app.conf.task_time_limit
    client = connections.backend(task.app)
    running.offer(
        client, str(task.request.group), where, fold, ref, float(hard) + 10, get_settings().result_expires
    )


def _register(definition: FanoutTask[Any, Any]) -> Any:
    """Register ``definition``'s header task on the one app, under its name."""

    def header(
        self: Task,
        start: int,
        items: list[Any] | dict[str, Any],
        kwargs: dict[str, Any] | None = None,
        where: str | None = None,
    ) -> Any:
        # ``where``: the job's directory in the results location, for a job sent by
        # reference; the part goes there and a reference to it through the chord.
        batch = logs.begin(self.request.chord, definition.name, start, items)  # names the job in its lines
        try:
            listed = batch_items(items)
        except Exception as exc:  # a header must return, or the chord fails
            if not isinstance(items, dict) or "count" not in items:
                raise
            source = items.get("url") or items.get("chunks")
            logger.warning("cannot read the items at %s", source, exc_info=True)
            reason = f"could not read this batch's items from {source}: {describe(exc)}"
            part = fail_batch(start, [None] * int(items["count"]), reason)
            counts = metrics.batch_counts(part, None, {})  # counted for the exporter, as a batch that ran
            metrics.count_at_end(
                self.request, definition.name, self.request.group, counts, None, get_settings().result_expires
            )
        else:
            part = definition.run_batch(self, start, listed, kwargs or {})
        softlimit.hold("reporting a finished batch")  # released when the task ends
        if not self.request.chord:  # no chord report for its last writes to ride with
            batchio.batch_end(self.request).send(connections.backend(self.app))
        if definition.fold is not None:  # the batch's partial and failures travel, not its results
            part = fold_part(definition.fold, part, json_problem)
        if where is None:
            logs.finished(batch, part)
            return part
        from workers.results import write_part

        ref = write_part(where, part)
        if definition.fold is not None and self.request.group:  # merged as it arrives (workers/running.py)
            _offer(self, definition.fold, where, dict(ref))
        logs.finished(batch, part)
        return ref

    header.__name__ = header.__qualname__ = definition.name.rsplit(".", 1)[-1]
    header.__module__ = definition.fn.__module__
    header.__doc__ = definition.fn.__doc__
    limits: dict[str, Any] = {}
    if definition.time_limit:
        limits = {"time_limit": definition.time_limit, "soft_time_limit": definition.soft_time_limit}
    return app.task(
        name=definition.name,
        bind=True,
        # Parts travel to the callback through the chord's own join, not as results.
        ignore_result=True,
        Request=HEADER_REQUEST,
        typing=False,
        fanout_task=definition,
        **limits,
    )(header)


@overload
def task(fn: Callable[P, R], /) -> FanoutTask[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    batch_size: int | None = None,
    time_limit: int | None = None,
    retries: int = 0,
    retry_on: tuple[type[BaseException], ...] = (),
    backoff: float = 1.0,
    label: Callable[[Any], Any] | None = None,
    fold: Fold[Any] | None = None,
) -> Callable[[Callable[P, R]], FanoutTask[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    batch_size: int | None = None,
    time_limit: int | None = None,
    retries: int = 0,
    retry_on: tuple[type[BaseException], ...] = (),
    backoff: float = 1.0,
    label: Callable[[Any], Any] | None = None,
    fold: Fold[Any] | None = None,
) -> FanoutTask[P, R] | Callable[[Callable[P, R]], FanoutTask[P, R]]:
    """Make ``fn(item, **kwargs)`` a fanout task; as ``@task`` or ``@task(...)``.

    ``name``: what workers know it by (default ``module.function``).
    ``batch_size``: the most items one batch holds, a cap "auto" stays below (default: none;
    "auto" sizes batches by how long items take, see orchestrator/stream.py).
    ``time_limit``: seconds one batch may run before its process is killed (default:
    ``FANOUT_TASK_TIME_LIMIT``); the soft limit, which stops the batch at its
    current item, comes 10 s earlier.
    ``retries``, ``retry_on``, ``backoff``: an item raising one of ``retry_on`` is run
    again up to ``retries`` times, after ``backoff``, then twice that, and so on.
    ``label``: how an item is named in its error (default: the item itself).
    ``fold``: a :class:`~workers.folding.Fold`; every job of the task then folds its
    results into one value (``outcome.reduced``) instead of returning them.
    """
    if batch_size is not None and batch_size < 1:
        raise BadTask(f"batch_size must be at least 1, got {batch_size}")
    if time_limit is not None and time_limit < 1:
        raise BadTask(f"time_limit must be at least 1 second, got {time_limit}")
    if retries < 0 or backoff < 0:
        raise BadTask("retries and backoff cannot be negative")
    if not isinstance(retry_on, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
    ):
        raise BadTask("retry_on must be a tuple of exception classes")
    if fold is not None and not isinstance(fold, Fold):
        raise BadTask(f"fold must be a fanout.Fold, got {type(fold).__name__}")

    def decorate(func: Callable[P, R]) -> FanoutTask[P, R]:
        if not callable(func):
            raise BadTask(f"@fanout.task needs a function, got {type(func).__name__}")
        return FanoutTask(
            func,
            name or default_name(func),
            batch_size,
            time_limit,
            retries,
            retry_on,
            backoff,
            label,
            fold,
        )

    return decorate(fn) if fn is not None else decorate


def lookup(name: str) -> FanoutTask[Any, Any] | None:
    """The fanout task registered in this process as ``name``, if any."""
    registered = app.tasks.get(name)
    definition = getattr(registered, "fanout_task", None)
    return definition if isinstance(definition, FanoutTask) else None
