"""Streamed jobs: items too many to hold, read once, sent in batches sized by time.

A job whose items come as an iterator (a generator, ``fanout map --input``)
and outnumber FANOUT_BY_REFERENCE_ITEMS is *streamed* (orchestrator/plan.py
decides).  It is sent in two passes, and the client holds no more than one
input chunk and a few batches' sizes, whatever the job's size:

1. **Spool** (:func:`spool`): the items are read once, checked, and written to
   the job's results location as input chunks of ``CHUNK_ITEMS`` items
   (``inputs/chunk-N.json``), where the workers read them, and where the healer
   and ``fanout retry`` find them again.  A line that is not JSON (or an item
   that JSON cannot carry) stops it there: InputError naming the line, the
   chunks are removed, and nothing has been sent, so nothing runs.  This is the
   validating first pass (rather than a job cancelled when the bad line turns
   up): a job cancelled late has run most of its items, side effects included,
   and "nothing runs" is the promise.  The spool is the one copy the job needs
   anyway (it is sent by reference), so the check costs no second read of stdin.
2. **Dispatch** (:func:`publish`): header messages go out as slices of the
   chunks, their sizes chosen by :class:`Sizer` (``auto``: by how long items
   take, as joblib's ``batch_size="auto"``), a few batches ahead of the
   workers.  Each batch's first index goes to ``keys.starts`` (8 bytes a batch,
   in Redis) for the healer.  The chord's size is not known until the last
   batch: it is set then, by :data:`CLOSE_LUA`, which also says whether every
   batch has already reported; if so the client completes the chord itself
   (Celery's own claim makes sure exactly one party sends the callback).

The job's record, and the healer's watch, start once the last batch is sent:
a job still being sent is never judged stuck, nor healed.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice, repeat
from operator import itemgetter, sub
from typing import Any

from celery import Celery
from celery.app.task import Context

from orchestrator import canvas
from orchestrator.follow import batches_done
from orchestrator.jobs import Job
from orchestrator.plan import Plan, check_items, failure_budget
from orchestrator.publish import HeaderSender, bulk_supported, cancel_sent, frozen_callback, task_limits
from orchestrator.room import require_room
from workers import connections, keys, results
from workers.batches import batch_task_id, header_args, slice_ref
from workers.errors import InputError
from workers.settings import get_settings

#: What a batch should take on a worker, seconds: long enough that the ~ms a task costs is
#: under 1% of it, short enough that the last batches end together (and far inside the soft limit).
TARGET_S = 1.0
#: The first batches' size, before any item has been timed (joblib starts at 1 too).
START_ITEMS = 1
#: The largest batch ``auto`` makes when the task sets no ``batch_size``: bounds the memory of
#: one batch's results, on the worker and in the client that reads its part (at 500,000 the
#: client of a 20M-item job peaked at 221 MB; at most 330,000, 133 MB).
MAX_AUTO_ITEMS = 200_000
#: Batches sent ahead of the workers, per worker process (joblib's ``pre_dispatch`` is 2).
AHEAD_PER_PROCESS = 2
#: Near the end, a batch is at most this share of what is left per process, so the last ones end together.
TAIL_SHARE = 2
#: How often the dispatcher looks at the chord's count while it waits for room ahead, seconds.
POLL_S = 0.02
#: With nothing done for this long (and at least 3 batch times), the dispatcher stops waiting
#: for the workers and sends the rest at the size it has: the client's wait judges stalls.
PATIENCE_S = 10.0
#: Header messages (and their starts) pushed per round trip.
SEND_CHUNK = 500


class JsonLines:
    """JSON Lines, one value per line, as raw lines: parsed where the values are needed.

    A job of few lines is parsed here (:meth:`parse`); a streamed one is checked
    line by line and written as it is (:func:`spool`), never parsed into values.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = lines

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines)

    @staticmethod
    def parse(lines: Iterable[str], first: int = 1) -> list[Any]:
        """The values of ``lines`` (line ``first`` onwards); InputError naming the first bad line."""
        values: list[Any] = []
        for number, line in enumerate(lines, first):
            if not line.strip():
                raise InputError(f"line {number} is empty: JSON Lines holds one JSON value per line")
            try:
                values.append(json.loads(line))
            except ValueError as exc:
                raise InputError(f"line {number} is not JSON: {exc}") from None
        return values


#: The C scanner json.loads itself runs: one value from a position, and where it ends.
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def check_lines(block: list[str], first: int) -> None:
    """InputError naming the first line of ``block`` (line ``first`` onwards) that is not one JSON value.

    The fast path runs the C scanner over every line without a Python loop and
    checks that each value ends where its line does (the newline); a block with
    anything else (a bad line, spaces around a value, no final newline) is checked
    again line by line, which names the culprit or accepts the block.
    """
    try:
        ends = list(map(itemgetter(1), map(_scan, block, repeat(0))))
    except (ValueError, StopIteration):  # StopIteration ends map() early: the lengths differ below
        ends = []
    if ends == list(map(sub, map(len, block), repeat(1))) and block[-1].endswith("\n"):
        return
    JsonLines.parse(block, first)


def _chunk_of_items(block: list[Any], first: int) -> bytes:
    try:
        return json.dumps(block, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        check_items(block, first)  # names the item JSON cannot carry
        raise


def spool(source: Iterable[Any], where: str, chunk: int) -> int:
    """Read ``source`` once into input chunks of ``chunk`` items under ``where``; return the count.

    JSON Lines are checked line by line and written as they are; other items are
    written as JSON.  InputError, naming the line or item, at the first that is not
    JSON (the chunks written so far stay: the caller removes the job's directory).
    """
    count, number = 0, 0
    iterator = iter(source)
    lines = isinstance(source, JsonLines)
    while block := list(islice(iterator, chunk)):
        if lines:
            check_lines(block, count + 1)
            data = ("[" + ",".join(block) + "]").encode()
        else:
            data = _chunk_of_items(block, count)
        results.write_bytes(results.chunk_url(where, number), data)
        count += len(block)
        number += 1
    return count


class Sizer:
    """How many items the next batch gets: pure, fed with the chord's count as it grows.

    ``fixed``: every batch that size.  ``auto``: start at START_ITEMS, then time
    the items from the batches done (the workers' busy time over the items they
    finished, counting a process busy while a batch sent is not done, over as many
    batches as there are processes) and aim
    each batch at TARGET_S, never more than ``cap``.  Growth is not bounded (the
    first batches, all overhead, make the time per item look long: it only
    shrinks as batches grow); a drop is at most half a step, so one slow poll does
    not collapse the size.  Only the sizes of the batches not done are kept.
    """

    def __init__(
        self, processes: int, cap: int | None = None, fixed: int | None = None, target_s: float = TARGET_S
    ) -> None:
        self.processes = max(1, processes)
        self.cap = cap or MAX_AUTO_ITEMS
        self.fixed = fixed
        self.target_s = target_s
        self.size = fixed or min(START_ITEMS, self.cap)
        #: Sizes of the batches sent and not yet done, oldest first (at most ``ahead`` while pacing).
        self.pending: deque[int] = deque()
        self.item_s: float | None = None
        self.largest = 0
        self._seen_at: float | None = None
        self._busy_s = 0.0
        self._items = 0
        self._batches = 0

    @property
    def auto(self) -> bool:
        return self.fixed is None

    @property
    def ahead(self) -> int:
        """How many batches may be sent and not done before the dispatcher waits."""
        return AHEAD_PER_PROCESS * self.processes

    def next_size(self, remaining: int) -> int:
        size = self.size
        if self.auto:  # the last batches smaller, so that every process ends about together
            size = min(size, max(1, math.ceil(remaining / (self.processes * TAIL_SHARE))))
        return max(1, min(size, remaining))

    def sent(self, size: int, now: float) -> None:
        self.largest = max(self.largest, size)
        if self.auto:  # a fixed size keeps nothing per batch
            self._account(now)
            self.pending.append(size)

    def stop_timing(self) -> None:
        """Keep the size as it is from here on, and nothing per batch (the dispatcher stops pacing)."""
        self.fixed = self.size
        self.pending.clear()

    def done(self, count: int, now: float) -> None:
        """``count`` more batches are done (taken as the oldest: the queue is FIFO)."""
        self._account(now)
        for _ in range(min(count, len(self.pending))):
            self._items += self.pending.popleft()
            self._batches += 1
        # Timed over as many batches as processes at least: one batch alone says little.
        if not self.auto or self._batches < min(self.processes, self.ahead) or self._busy_s <= 0:
            return
        self.item_s = self._busy_s / self._items
        self._busy_s, self._items, self._batches = 0.0, 0, 0
        ideal = int(self.target_s / self.item_s) if self.item_s > 0 else self.cap
        self.size = max(1, min(self.cap, max(ideal, self.size // 2)))

    def _account(self, now: float) -> None:
        """Count the processes' busy time since the last look: one per batch not done, at most all."""
        if self._seen_at is not None:
            self._busy_s += (now - self._seen_at) * min(self.processes, len(self.pending))
        self._seen_at = now

    def patience(self) -> float:
        batch_s = (self.item_s or 0.0) * self.size
        return max(PATIENCE_S, 3 * batch_s)


# Sets a chord's size once its last header message is sent, and says, in the same atomic
# step, whether every part has already reported (none of them could complete the chord
# without its size): then it returns one member of the chord's reported set ("task
# id:index"), to report again under the same name, which completes it (Celery's own claim
# sends the callback once).  KEYS: size, join, total diff, reported set; ARGV: size,
# expiry (0: none), whether the join is ordered (a sorted set) or a list.
CLOSE_LUA = """
local skey, jkey, tkey, dkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local size, expires = tonumber(ARGV[1]), tonumber(ARGV[2])
if expires > 0 then redis.call('SET', skey, size, 'EX', expires) else redis.call('SET', skey, size) end
local ready
if ARGV[3] == '1' then ready = redis.call('ZCARD', jkey) else ready = redis.call('LLEN', jkey) end
local diff = tonumber(redis.call('GET', tkey) or '0')
if ready == size + diff then return redis.call('SRANDMEMBER', dkey) or false end
return false
"""


def close_chord(app: Celery, group_id: str, size: int, callback: dict[str, Any]) -> bool:
    """Set the chord's size to ``size``; complete it here if its parts are all in.  True if completed here."""
    backend = app.backend
    names = [backend.get_key_for_group(group_id, suffix) for suffix in (".s", ".j", ".t", ".d")]
    ordered = "1" if getattr(backend, "_chord_zset", True) else "0"
    client = connections.backend(app)
    member = client.eval(CLOSE_LUA, 4, *names, size, int(backend.chord_expires or 0), ordered)
    if not member:
        return False
    task_id, _, index = (member.decode() if isinstance(member, bytes) else str(member)).rpartition(":")
    # Reported already under this name: counted once, and Celery's join finds the chord complete.
    request = Context(id=task_id, group=group_id, group_index=int(index), chord=callback, ignore_result=True)
    backend.on_chord_part_return(request, "SUCCESS", None)
    return True


def publish(
    app: Celery, plan: Plan, batch_size: int | None, max_failures: int | str | None, processes: int
) -> Job:
    """Spool a streamed ``plan``'s items, then send its batches (``batch_size``, or auto) and record it."""
    spec = plan.spec
    assert (
        spec.where is not None
        and spec.root is not None
        and spec.chunk is not None
        and plan.source is not None
    )
    settings = get_settings()
    expires = settings.result_expires
    results.check_writable(spec.root)
    try:
        total = spool(plan.source, spec.where, spec.chunk)
        if not total:
            raise InputError("no items: nothing to send")
    except BaseException:
        results.remove_tree(spec.where)  # nothing was sent: nothing is kept
        raise
    plan = replace(plan, source=None, count=total)
    try:  # a fixed size sends every batch at once: refused if they would not fit in Redis
        require_room(app, plan, math.ceil(total / (batch_size or total)))
    except BaseException:
        results.remove_tree(spec.where)
        raise
    budget = failure_budget(max_failures, total)
    group_id = str(uuid.uuid4())
    client = connections.backend(app)
    callback = frozen_callback(canvas.callback(plan), group_id)
    tail = (spec.kwargs, spec.where)
    sizer = Sizer(processes, cap=spec.batch_cap, fixed=batch_size)
    probe = app.signature(spec.task, args=header_args(0, [], tail)).set(
        immutable=True, ignore_result=True, task_id=batch_task_id(plan.job_id, 0)
    )
    sent_at = time.time()
    try:
        if budget is not None:  # in place before any header task can run
            client.set(keys.budget(group_id), f"{budget}/{total}", ex=expires)
        with HeaderSender(
            app, spec.task, group_id, callback, SEND_CHUNK, bulk_supported(app, [probe])
        ) as sender:
            batches = _dispatch(app, plan, sender, sizer, tail, group_id, expires)
        close_chord(app, group_id, batches, callback)
    except BaseException as exc:
        cancel_sent(app, group_id, expires, plan.job_id, exc)
        raise
    hard, soft = task_limits(app, spec.task)
    job = Job(
        plan.job_id,
        group_id,
        spec,
        total,
        sizer.largest,
        batches,
        sent_at=sent_at,
        heal={
            "task": spec.task,
            "queue": sender.queue,
            "tail": list(tail),
            "callback": callback,
            "limits": [hard, soft],
        },
        app=app,
    )
    job.save(expires)
    return job


def _dispatch(
    app: Celery,
    plan: Plan,
    sender: HeaderSender,
    sizer: Sizer,
    tail: tuple[Any, ...],
    group_id: str,
    expires: int,
) -> int:
    """Send every batch of ``plan``, pacing ``auto`` on the chord's count; return how many were sent."""
    spec, total = plan.spec, plan.total
    assert spec.where is not None and spec.chunk is not None
    client = connections.backend(app)
    starts_key = keys.starts(plan.job_id)
    starts = bytearray()
    index, start, seen = 0, 0, 0
    pacing = sizer.auto
    moved_at = time.monotonic()

    def push() -> None:
        sender.flush()
        if starts:
            with client.pipeline(transaction=False) as pipe:
                pipe.append(starts_key, bytes(starts))
                pipe.expire(starts_key, expires)
                pipe.execute()
            starts.clear()

    while start < total:
        stop = start + sizer.next_size(total - start)
        sender.send(
            index,
            batch_task_id(plan.job_id, index),
            header_args(start, slice_ref(spec.where, start, stop, spec.chunk), tail),
            {"ignore_result": True},
        )
        starts += start.to_bytes(8, "big")
        sizer.sent(stop - start, time.monotonic())
        index, start = index + 1, stop
        if len(starts) >= 8 * SEND_CHUNK:
            push()
        while pacing and start < total and len(sizer.pending) >= sizer.ahead:
            push()
            now = time.monotonic()
            done = batches_done(app, group_id)
            if done > seen:
                sizer.done(done - seen, now)
                seen, moved_at = done, now
            elif now - moved_at > sizer.patience():
                pacing = False  # the workers are slow to answer: the rest goes at this size
                sizer.stop_timing()
            else:
                sizer.done(0, now)
                time.sleep(POLL_S)
    push()
    return index
