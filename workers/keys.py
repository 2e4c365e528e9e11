"""Every Redis key fanout itself writes, named in one place.

Celery's own keys (task results, the chord's join set) are named by Celery;
these are fanout's, next to them in the result backend's database.
"""

from __future__ import annotations

#: A job's record: what ``fanout status`` and ``Job.attach`` need to find it again (JSON).
JOB = "fanout:job:{job_id}"
#: Runs of one header batch, counted to cap poison items (workers/attempts.py).
BATCH_RUNS = "fanout:runs:{task_id}"
#: Per-item unfinished runs of one header batch (a hash: item index -> count).
ITEM_RUNS = "fanout:unfinished:{task_id}"
#: Why a job was stopped ("cancelled", "failure budget exceeded: ..."), by its chord's group id.
STOP = "fanout:stop:{group_id}"
#: A job's failure budget, "most failures allowed/items in the job", by group id.
BUDGET = "fanout:budget:{group_id}"
#: How many of a job's items have failed so far (counted only under a budget), by group id.
FAILURES = "fanout:failures:{group_id}"
#: A job's input items (zlib-compressed JSON), kept so that its failed items can be sent again.
INPUTS = "fanout:inputs:{job_id}"
#: The set of worker host names that registered themselves (workers/registration.py).
WORKERS = "fanout:workers"
#: One worker's registration (JSON), kept alive by the worker, gone soon after it dies.
WORKER = "fanout:worker:{hostname}"
#: The jobs whose fan-in has not run yet (a sorted set of job ids, scored by when they were
#: sent): what the healer (workers/healing.py) watches.
ACTIVE = "fanout:active"
#: A bitmap of a job's batches the chord has counted (bit = the batch's index), by group id.
DONE = "fanout:done:{group_id}"
#: Where each batch of a streamed job starts (its first item's index, 8 bytes big-endian a
#: batch, in batch order): its batches have sizes of their own (orchestrator/stream.py).
STARTS = "fanout:starts:{job_id}"
#: How many of a job's batches the healer has sent again.
HEALED = "fanout:healed:{job_id}"
#: Why a job cannot complete: a batch Redis dropped whose inputs are gone too.
UNHEALABLE = "fanout:unhealable:{job_id}"
#: Which worker heals now (a lease, renewed while it lives).
HEALER = "fanout:healer"
#: A job's purges not yet reported to its chord (a hash: purge id -> when), by group id.
PURGES = "fanout:purges:{group_id}"
#: The messages one purge took off the queue, kept until they are reported.
PURGED = "fanout:purged:{group_id}:{purge_id}"
#: A fold's partials written but not yet in its running total (a list of JSON [start, count, url]),
#: the lock of the round merging them, and the URL of the running total (workers/running.py).
FOLD_PENDING = "fanout:fold:pending:{group_id}"
FOLD_LOCK = "fanout:fold:lock:{group_id}"
FOLD_TOTAL = "fanout:fold:total:{group_id}"
#: A one-second key a stalled client writes to learn whether Redis refuses writes (orchestrator/room.py).
ROOM_PROBE = "fanout:room-probe"


def job(job_id: str) -> str:
    return JOB.format(job_id=job_id)


def batch_runs(task_id: str) -> str:
    return BATCH_RUNS.format(task_id=task_id)


def item_runs(task_id: str) -> str:
    return ITEM_RUNS.format(task_id=task_id)


def stop(group_id: str) -> str:
    return STOP.format(group_id=group_id)


def budget(group_id: str) -> str:
    return BUDGET.format(group_id=group_id)


def failures(group_id: str) -> str:
    return FAILURES.format(group_id=group_id)


def inputs(job_id: str) -> str:
    return INPUTS.format(job_id=job_id)


def worker(hostname: str) -> str:
    return WORKER.format(hostname=hostname)


def done(group_id: str) -> str:
    return DONE.format(group_id=group_id)


def starts(job_id: str) -> str:
    return STARTS.format(job_id=job_id)


def healed(job_id: str) -> str:
    return HEALED.format(job_id=job_id)


def unhealable(job_id: str) -> str:
    return UNHEALABLE.format(job_id=job_id)


def purges(group_id: str) -> str:
    return PURGES.format(group_id=group_id)


def purged(group_id: str, purge_id: str) -> str:
    return PURGED.format(group_id=group_id, purge_id=purge_id)


def fold_pending(group_id: str) -> str:
    return FOLD_PENDING.format(group_id=group_id)


def fold_lock(group_id: str) -> str:
    return FOLD_LOCK.format(group_id=group_id)


def fold_total(group_id: str) -> str:
    return FOLD_TOTAL.format(group_id=group_id)
