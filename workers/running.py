"""A fold's running total: partials merged as they arrive, by the header tasks, for a job sent by reference.

Without it the chord callback would merge every partial of a job at its end,
one at a time (bounded memory, but a time that grows with the job, on the
critical path and under the callback's time limit).  With it:

* each header task, once its part's file is written, puts the reference on
  the job's *pending* list (Redis); when :data:`ROUND` or more are pending, the
  header that takes the job's lock (``SET NX``, expiring after the longest a header
  can live) runs a *round*: it reads the running total (a file whose URL is in
  Redis), merges pending partials into it one at a time for at most
  :data:`ROUND_SECONDS`, writes the new total to a file of its own, and, while it
  still holds the lock, points Redis at it and trims what it merged off the list
  (one Lua script); so a round holds the total and one partial, as the callback does;
* the total records which batches it *covers* (first index, count and the URL
  of the part merged): a batch reported twice is merged once, by its first
  index, whichever run's file came first;
* the callback (:func:`snapshot`) reads the latest total and merges only the
  partials it does not cover (workers/folding.py ``merge_folded``): those of the
  last, short round, and any a round lost;
* nothing depends on a round having run: one that fails (a worker killed
  mid-round, a file that cannot be written) is logged and leaves the pending
  list as it was, and the callback merges what the total lacks.

Partials merge in the order they arrive, so the fold's merge must be
commutative as well as associative (as Spark's ``reduce`` asks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any

from workers import keys, results, storage
from workers.fanin import describe
from workers.folding import Fold

logger = logging.getLogger(__name__)

#: A round starts once this many partials are pending: each round reads and writes the
#: total once, so merging a few at a time keeps that cost small beside the merges.
ROUND = 16
#: The most partials one round merges, and the longest it merges for, seconds (it runs
#: in a header task, after its items, within the task's hard time limit).
ROUND_MAX = 256
ROUND_SECONDS = 3.0
TOTALS = "fold"

# Commit a round: only if this round still holds the lock, point at its total and trim
# the partials it merged off the pending list.
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
redis.call('LTRIM', KEYS[3], tonumber(ARGV[3]), -1)
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def offer(
    client: Any, group_id: str, where: str, fold: Fold[Any], ref: dict[str, Any], lock_s: float, expires: int
) -> None:
    """Put ``ref`` (a part just written) on the job's pending list, and run a round if one is due.

    Never raises: the callback merges whatever a failed round left out.
    """
    try:
        pending = keys.fold_pending(group_id)
        with client.pipeline(transaction=False) as pipe:
            pipe.rpush(pending, json.dumps([ref["start"], ref["count"], ref["url"]]))
            pipe.expire(pending, expires)
            waiting = pipe.execute()[0]
        if waiting >= ROUND:
            merge_round(client, group_id, where, fold, lock_s, expires)
    except Exception:  # an optimisation only: the callback covers for it
        logger.warning(
            "fold of group %s: a round failed; the callback merges its partials", group_id, exc_info=True
        )


def merge_round(client: Any, group_id: str, where: str, fold: Fold[Any], lock_s: float, expires: int) -> int:
    """One round, if this process gets the lock: pending partials merged into a new total.

    Returns how many pending entries it took off the list (0 if another round ran).
    """
    lock, token = keys.fold_lock(group_id), uuid.uuid4().hex
    if not client.set(lock, token, nx=True, px=int(lock_s * 1000)):
        return 0
    new_url, began = None, time.monotonic()
    try:
        current = client.get(keys.fold_total(group_id))
        total = load(current.decode()) if current else empty()
        covered = {int(c[0]): c for c in total["covered"]}
        value, error = fold.start(), total["error"]
        if current and error is None:  # merged into a fresh initial: the fold's type again, not JSON's
            value = fold.combine(value, total["value"])
        entries = client.lrange(keys.fold_pending(group_id), 0, ROUND_MAX - 1)
        taken, deadline = 0, time.monotonic() + ROUND_SECONDS
        for raw in entries:
            if time.monotonic() > deadline:
                break
            taken += 1
            start, count, url = json.loads(raw)
            if start in covered:
                continue  # a batch reported twice: merged once
            if error is None:
                part = results.read_part(url)
                if "fold_error" in part:
                    error = str(part["fold_error"])
                elif "partial" in part:
                    try:
                        value = fold.combine(value, part["partial"])
                    except Exception as exc:  # noqa: BLE001 - the job's reduce_error, as in the callback
                        error = f"the fold's merge raised at the batch of item {start}: {describe(exc)}"
                del part
            covered[start] = [start, count, url]
        if not taken:
            return 0
        new_url = storage.join(where, f"{TOTALS}/total-{uuid.uuid4().hex[:12]}.json")
        results.write_json(
            new_url,
            {"covered": sorted(covered.values()), "value": None if error else value, "error": error},
        )
        keys_ = [lock, keys.fold_total(group_id), keys.fold_pending(group_id)]
        if not client.eval(_COMMIT, 3, *keys_, token, new_url, taken, expires):
            results.remove(new_url)  # the lock expired under this round: another took over
            return 0
        if current:  # the callback may be reading it: it reads the latest again if this one is gone
            with contextlib.suppress(Exception):
                results.remove(current.decode())
        logger.info(
            "fold of group %s: %d pending partials merged in %.2f s, %d covered",
            group_id, taken, time.monotonic() - began, len(covered),
        )  # fmt: skip
        return taken
    except BaseException:
        if new_url is not None:
            with contextlib.suppress(Exception):
                results.remove(new_url)
        raise
    finally:
        with contextlib.suppress(Exception):
            client.eval(_RELEASE, 1, lock, token)


def empty() -> dict[str, Any]:
    return {"covered": [], "value": None, "error": None}


def load(url: str) -> dict[str, Any]:
    total: dict[str, Any] = results.read_json(url)
    return total


def snapshot(client: Any, group_id: str) -> dict[str, Any] | None:
    """The latest running total of the job (None if no round ever ran), for its callback.

    A round that commits meanwhile removes the file this read: the latest is read again.
    """
    for _ in range(20):
        current = client.get(keys.fold_total(group_id))
        if not current:
            return None
        try:
            return load(current.decode())
        except FileNotFoundError:
            continue
    return None


def forget(client: Any, group_id: str) -> None:
    """The job's pending list, once its callback has merged.  The total's key stays until it
    expires (with the job's results): a callback delivered again reads the same total."""
    client.delete(keys.fold_pending(group_id))
