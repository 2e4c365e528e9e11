"""The chord callback of every job: the fan-in.

``fanout.collect`` merges the header parts of a job back into one outcome in
input order (:mod:`workers.fanin`, or part by part for a job sent by
reference, :mod:`workers.results`), merges a retry's outcome into the job it
retried, records why the job was stopped, and runs the job's reduce, if it
names one; for a task with a fold, it merges the batches' partials instead
(:mod:`workers.folding`).  It is generic: it knows no job by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import IO, Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from workers import connections, folding, keys, results, running, storage
from workers.app import app
from workers.core import lookup
from workers.fanin import ItemFailure, OutcomeDoc, describe, merge, merge_retry
from workers.settings import get_settings

logger = logging.getLogger(__name__)


@app.task(name="fanout.collect", bind=True)
def collect(self: Task, parts: list[Any], job: dict[str, Any]) -> OutcomeDoc:
    """The chord callback: merge the header parts into one outcome in input order, then reduce.

    ``job`` carries ``job_id``, ``task`` and ``total``, and optionally ``reduce``
    (a fanout task's name) with ``reduce_kwargs``, and ``retry_of`` with
    ``indexes`` (this job ran those items of an earlier job again: the two
    outcomes are merged).  A reduce that fails leaves the outcome complete,
    with ``reduce_error`` saying why.  With ``fold`` (the fanout task whose fold
    it is), the parts carry partials, merged one at a time into ``reduced``.
    """
    job_id = str(job["job_id"])
    where = job.get("where")
    if job.get("fold"):
        group = self.request.group
        outcome = fold_outcome(
            str(job["fold"]), parts, job_id, str(job["task"]), int(job["total"]), where, group
        )
    elif where:  # sent by reference: the parts are files, the joins carry where they are
        outcome = results.merge_refs(parts, int(job["total"]), job_id, str(job["task"]), str(where))
    else:
        outcome = merge(parts, int(job["total"]), job_id, str(job["task"]))
    if job.get("retry_of") and not job.get("fold"):
        previous = self.app.backend.get_task_meta(str(job["retry_of"]))
        if previous.get("status") == "SUCCESS":
            indexes = job["indexes"] if "indexes" in job else results.read_json(str(job["indexes_url"]))
            earlier: OutcomeDoc = previous["result"]
            if where and "ref" in earlier:  # both by reference: merged a part at a time
                outcome = results.merge_retry_refs(earlier, outcome, indexes, job_id, str(where))
            else:
                merged = merge_retry(
                    results.materialize(earlier), results.materialize(outcome), list(indexes), job_id
                )
                outcome = results.keep(merged, str(where)) if where else merged
        else:
            outcome["stopped"] = f"the outcome of job {job['retry_of']} is gone (expired?): not merged"
    if self.request.group:
        raw = connections.backend(self.app).get(keys.stop(str(self.request.group)))
        if raw:
            outcome["stopped"] = raw.decode()
    name = job.get("reduce")
    if name:
        # A reduce takes lists: a job sent by reference has them built here, from its parts.
        whole = results.materialize(outcome)
        outcome.update(reduce_outcome(str(name), whole, dict(job.get("reduce_kwargs") or {})))  # type: ignore[typeddict-item]
        del whole
    if where and job.get("root"):
        try:
            results.sweep(str(job["root"]), get_settings().result_expires)
        except Exception:  # an old job left behind is no reason to fail this one
            logger.warning("could not sweep the results location %s", job.get("root"), exc_info=True)
    return outcome


def reduce_outcome(name: str, outcome: OutcomeDoc, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"reduced": value}`` from the reduce task ``name``, or ``{"reduce_error": reason}``."""
    definition = lookup(name)
    if definition is None:
        return {"reduce_error": f"no task {name} on this worker (set FANOUT_IMPORTS on the workers)"}
    try:
        return {"reduced": definition.reduce(outcome["results"], outcome["errors"], kwargs)}
    except SoftTimeLimitExceeded:
        return {"reduce_error": f"{name}: the reduce ran past its soft time limit"}
    except Exception as exc:
        logger.warning("reduce %s raised", name, exc_info=True)
        return {"reduce_error": f"{name}: {describe(exc)}"}


def _writing_errors(
    url: str, fill: Callable[[Callable[[ItemFailure], None]], folding.Folded]
) -> folding.Folded:
    """``fill(write)``, ``write`` putting each failure as a line of ``url`` (written atomically)."""
    done: list[folding.Folded] = []

    def body(fh: IO[bytes]) -> None:
        def write(failure: ItemFailure) -> None:
            fh.write(json.dumps(failure, separators=(",", ":")).encode() + b"\n")

        done.append(fill(write))

    storage.write_atomic(url, body)
    return done[0]


def fold_outcome(
    name: str, parts: list[Any], job_id: str, task: str, size: int, where: str | None, group: str | None
) -> OutcomeDoc:
    """The outcome of a job of the fanout task ``name``, which folds: its partials merged in input order.

    One partial is held at a time (a job sent by reference reads each from its
    file); the failures go to the outcome, or to ``errors.jsonl`` by reference.
    """
    definition = lookup(name)
    fold = definition.fold if definition is not None else None
    # By reference, the header tasks merged most partials as they arrived: the latest running total.
    total = running.snapshot(connections.backend(app), str(group)) if where and group and fold else None

    def merged(write: Callable[[ItemFailure], None]) -> folding.Folded:
        return folding.merge_folded(
            parts,
            size,
            fold,
            lambda ref: results.read_part(str(ref["url"])),
            write,
            stop_on=(SoftTimeLimitExceeded,),
            running=total,
        )

    errors: list[ItemFailure] = []
    if where:
        done: folding.Folded = _writing_errors(storage.join(where, results.ERRORS), merged)
    else:
        done = merged(errors.append)
    if fold is None:
        done.error = f"no task {name} with a fold on this worker (set FANOUT_IMPORTS on the workers)"
    elif done.error is not None:
        logger.warning("fold %s of job %s: %s", name, job_id, done.error)
        done.error = f"{name}: {done.error}"
    outcome = folding.outcome_of(job_id, task, size, done, errors)
    if where and group:
        running.forget(connections.backend(app), str(group))
    if where:
        outcome["ref"] = where
        manifest = {key: value for key, value in outcome.items() if key != "reduced"}
        results.write_json(storage.join(where, results.OUTCOME), {**manifest, "parts": []})
    return outcome
