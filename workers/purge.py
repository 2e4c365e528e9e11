"""Taking a stopped job's queued batches off the queue: the purge.

Without it, every queued batch of a stopped job is still a message some worker
must receive, look at and drop (about a millisecond each).  A purge takes them
off in steps (:func:`purge_step`, one atomic script, bounded whatever the
queue's length), marks them done for the healer, and reports them to the chord
as parts whose items all failed with the job's stop reason, so the chord
completes and its callback runs as always.  ``fanout cancel`` purges at once;
the workers' healer purges a stopped job a step at a time (a failure budget's
stop, or a canceller that died mid-purge: :func:`finish_purge`).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from typing import Any, NamedTuple

from celery.app.task import Context

from workers import connections, keys, metrics
from workers.batches import batch_items
from workers.core import lookup
from workers.fanin import ItemFailure, Part, fail_batch
from workers.results import failure_run, write_part
from workers.settings import get_settings

logger = logging.getLogger(__name__)


#: The most messages one step of a purge takes off the queue: one atomic script, which
#: blocks Redis for about 10 us a message (20 ms a step), however long the queue.
PURGE_LIMIT = 2_000
#: A purge reports the batches it took as parts of at most about this many items each,
#: one part (one file, for a job sent by reference) per run of consecutive batches.
RUN_ITEMS = 100_000

# One step of a purge: takes the messages of one chord group off the tail of a kombu
# Redis queue (a list of JSON envelopes whose `headers.group` names the group and
# `headers.group_index` the batch: the chord's callback, which has none, stays; the
# workers pop its tail, the oldest), at most ARGV[2] of them, and in the same atomic
# step: marks their batches done for the healer (they are never sent again), keeps them
# in a purge list of their own until they are reported, and lowers the chord's count by
# all but one of them (they are reported as one part), through the chord's total diff,
# the counter Celery's `add_to_chord` raises.  A copy of a batch already marked done (a
# redelivery) is dropped: the chord has counted it.  The other messages looked at go
# back in their order: to the tail if the step looked at the whole queue, else to the
# head, behind the messages not looked at yet, so that the next step reads on.
# Returns the queue's length before the step (it looked at ARGV[2] of them at most) and the messages taken.
PURGE_LUA = """
local key, done, kept_key, purges, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, limit, expires = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local purge_id, now = ARGV[4], ARGV[5]
local n = redis.call('LLEN', key)
if n == 0 then return {0, {}} end
local all = redis.call('RPOP', key, math.min(n, limit))
local kept, taken = {}, {}
-- Plain finds (memchr), no JSON decoding: the base64 body before the headers holds no quote.
local function after(raw, name)
  local _, e = string.find(raw, '"' .. name .. '": ', 1, true)
  if not e then _, e = string.find(raw, '"' .. name .. '":', 1, true) end
  return e and e + 1
end
local quoted = '"' .. group .. '"'
for _, raw in ipairs(all) do
  local at = after(raw, 'group')
  local ai = at and string.sub(raw, at, at + #quoted - 1) == quoted and after(raw, 'group_index')
  local index = ai and tonumber(string.match(raw, '^(%d+)', ai))
  if index then
    if redis.call('GETBIT', done, index) == 0 then
      taken[#taken + 1] = raw
      redis.call('SETBIT', done, index, 1)
    end
  else
    kept[#kept + 1] = raw
  end
end
if #kept > 0 then
  if #all >= n then
    for i = #kept, 1, -1 do redis.call('RPUSH', key, kept[i]) end
  else
    for i = 1, #kept, 5000 do
      redis.call('LPUSH', key, unpack(kept, i, math.min(i + 4999, #kept)))
    end
  end
end
if #taken > 0 then
  for i = 1, #taken, 5000 do
    redis.call('RPUSH', kept_key, unpack(taken, i, math.min(i + 4999, #taken)))
  end
  redis.call('HSET', purges, purge_id, now)
  redis.call('INCRBY', total, 1 - #taken)
  for _, k in ipairs({done, kept_key, purges, total}) do redis.call('EXPIRE', k, expires) end
end
return {n, taken}
"""


def purge(
    app: Any, queue: str, group_id: str, reason: str, steps: int | None = None, limit: int | None = None
) -> int:
    """Take the job's batches still queued off ``queue``; report them to the chord as failed with ``reason``.

    Without this, every queued batch of a stopped job is still a message some
    worker must receive, look at and drop (about a millisecond each, more for a
    job sent by reference), so a job of 10,000 one-item batches takes seconds to
    end, and one of 200,000 minutes.  The queue is read in steps of at most
    ``limit`` (:data:`PURGE_LIMIT`) messages (:data:`PURGE_LUA`, each atomic and short, so Redis never
    stops answering for long), at most ``steps`` of them (None: until every
    message queued when the purge began has been looked at), each reported
    before the next is taken.  The batches a step takes are reported to the
    chord as *one* part holding a part per run of consecutive batches (every
    item failed with ``reason``), and the chord's count is lowered to match in
    the same atomic step that takes them: the chord completes and its callback
    runs as always.  Until that part is reported, the messages are kept in a
    purge list of their own, so that if this process dies first, the healer
    reports them (:func:`finish_purge`, idempotent).  This reads kombu's Redis
    message format (a JSON envelope, base64 body).  Returns the batches taken.
    """
    limit = limit or PURGE_LIMIT
    taken_in_all, looked_at, step = 0, 0, 0
    queued: int | None = None
    while steps is None or step < steps:
        step += 1
        length, taken = purge_step(app, queue, group_id, reason, limit)
        queued = length if queued is None else queued
        looked_at += min(length, limit)
        taken_in_all += taken
        if not length or looked_at >= queued:
            break
    return taken_in_all


def purge_step(app: Any, queue: str, group_id: str, reason: str, limit: int = PURGE_LIMIT) -> tuple[int, int]:
    """One step of :func:`purge`: the queue's length before it (it looked at ``limit`` of them
    at most), and the batches it took (and reported)."""
    purge_id = str(uuid.uuid4())
    length, taken = connections.backend(app).eval(
        PURGE_LUA,
        5,
        queue,
        keys.done(group_id),
        keys.purged(group_id, purge_id),
        keys.purges(group_id),
        app.backend.get_key_for_group(group_id, ".t"),
        group_id,
        limit,
        int(app.backend.expires or 86_400),
        purge_id,
        time.time(),
    )
    if taken:
        report_purged(app, group_id, purge_id, reason, taken)
    return int(length), len(taken)


def finish_purge(app: Any, group_id: str, purge_id: str, reason: str) -> int:
    """Report the batches of a purge whose process died before it reported them (the healer's)."""
    taken = connections.backend(app).lrange(keys.purged(group_id, purge_id), 0, -1)
    if taken:
        report_purged(app, group_id, purge_id, reason, taken)
    else:
        connections.backend(app).hdel(keys.purges(group_id), purge_id)
    return len(taken)


def report_purged(app: Any, group_id: str, purge_id: str, reason: str, taken: list[bytes]) -> None:
    """Report purged messages ``taken`` to their chord as one part, under the purge's id (once).

    A batch of a job sent by reference is reported without reading its items
    (a file each): a run of consecutive batches is one :func:`~workers.results.failure_run`.
    """
    batches: list[_Purged] = []
    parts: list[Any] = []
    chord: Any = None
    for raw in taken:
        try:
            batch, chord = _purged(raw, reason)
        except (KeyError, ValueError, TypeError, IndexError, OSError) as exc:
            # Counted in the chord already: an empty part keeps the count right, and the
            # merge reports its items as lost rather than waiting for them.
            logger.error(
                "a purged batch of group %s has another shape (%s): its items are lost", group_id, exc
            )
            parts.append({"start": 0, "results": [], "errors": [], "transient": 0})
            continue
        batches.append(batch)
    for run in _runs(sorted(batches, key=lambda batch: (batch.start, batch.number))):
        start, count, where = run[0].start, sum(batch.size for batch in run), run[0].where
        part: Part = {
            "start": start,
            "results": [None] * count,
            "errors": (
                [error for batch in run for error in batch.errors]
                if where is None
                else [failure_run(start, count, reason)]
            ),
            "transient": 0,
        }
        # A job sent by reference: the part goes to its results location, as a header's would
        # (one file a run, so the callback opens one file where it would have opened hundreds).
        parts.append(write_part(where, part) if where else part)
    # The same id and index whoever reports it: the chord counts it once.
    first = min([batch.number for batch in batches] or [0])
    request = Context(id=purge_id, group=group_id, group_index=first, chord=chord, ignore_result=True)
    combined = {"start": 0, "results": [], "errors": [], "transient": 0, "parts": parts}
    app.backend.mark_as_done(purge_id, combined, request=request, store_result=False)
    with connections.backend(app).pipeline(transaction=False) as pipe:
        pipe.delete(keys.purged(group_id, purge_id))
        pipe.hdel(keys.purges(group_id), purge_id)
        count_purged(pipe, group_id, batches)
        pipe.execute()


def count_purged(pipe: Any, group_id: str, batches: list[_Purged]) -> None:
    """Queue on ``pipe`` the exporter's counts of the purged batches: their items were cancelled."""
    by_task: dict[str, int] = {}
    for batch in batches:
        by_task[batch.task] = by_task.get(batch.task, 0) + batch.size
    expires = get_settings().result_expires
    for task, count in by_task.items():
        metrics.count_batch(pipe, task, group_id, metrics.BatchCounts(cancelled=count), None, expires)


class _Purged(NamedTuple):
    """A batch a purge took: where its items start, its index, how many items, their errors
    (listed; none for a job sent by reference), its results location."""

    start: int
    number: int  # the batch's index in its group
    size: int  # items
    errors: list[ItemFailure]
    where: str | None
    task: str  # the header task's name


def _runs(batches: list[_Purged]) -> list[list[_Purged]]:
    """``batches``, in order of start, cut into runs of consecutive batches (one results
    location, at most about RUN_ITEMS items)."""
    runs: list[list[_Purged]] = []
    end, size = -1, 0
    for batch in batches:
        if runs and batch.start == end and batch.where == runs[-1][0].where and size < RUN_ITEMS:
            runs[-1].append(batch)
            size += batch.size
        else:
            runs.append([batch])
            size = batch.size
        end = batch.start + batch.size
    return runs


def _purged(raw: bytes, reason: str) -> tuple[_Purged, Any]:
    """A queued header message as a purged batch whose items failed for ``reason``, and its chord."""
    envelope = json.loads(raw)
    headers = envelope["headers"]
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _, embed = json.loads(body)
    start, number = int(args[0]), int(headers.get("group_index") or 0)
    where = str(args[3]) if len(args) > 3 and args[3] else None
    if where is not None:  # by reference: the items' count is in the message (their bounds, or the file's)
        ref = args[1]
        count = int(ref["range"][1]) - int(ref["range"][0]) if "range" in ref else int(ref["count"])
        return _Purged(start, number, count, [], where, str(headers["task"])), embed["chord"]
    items = batch_items(args[1])
    definition = lookup(str(headers["task"]))
    label = definition.label if definition else (lambda item: item)
    errors = fail_batch(start, items, reason, label)["errors"]
    return _Purged(start, number, len(items), errors, where, str(headers["task"])), embed["chord"]
