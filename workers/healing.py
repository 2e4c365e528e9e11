"""The fan-in that heals: a batch whose message Redis dropped is noticed and sent again.

Redis can drop a header message: kombu's Redis transport pops a message
(``BRPOP``) before it records it as unacknowledged, so a worker killed in
between takes it along; a failover to an asynchronous replica loses the last
writes; an operator flushes a queue; a full Redis refuses the bookkeeping.
The chord then waits for a batch that will never report.  Left alone, the
job hangs until its client's timeout, and a job nobody waits for never ends.

A live batch is always somewhere: in its queue, in kombu's ``unacked`` hash
(reserved or running: messages are acknowledged late), or counted by the
chord (the job's done bitmap, set after the chord's count and before the
acknowledgement, see :mod:`workers.backend`).  The healer checks that for
every job not yet fanned in:

* every worker runs a healer (on its consumer's timer), and one at a time
  leads (a lease in Redis, renewed every cycle): jobs heal whether or not a
  client waits;
* each cycle (:data:`INTERVAL_S`) reads the active jobs and their done
  bitmaps (a few pipelined reads, whatever the jobs' sizes);
* a job with batches not done is *scanned* when it has not moved for
  :data:`STALL_S`, and every job at least every :data:`SWEEP_S`: one Lua
  script reads the queue and the unacked hash and returns which batches of
  those jobs are there;
* a batch found in none of the places in two scans at least
  :data:`CONFIRM_S` apart is lost: it is sent again from the job's kept
  inputs, with its own task id and index, so the chord counts it once and the
  merge keeps one result per index (the batch may have run: at-least-once);
* a lost batch whose inputs are gone cannot be sent again: the job is marked
  unhealable with the reason, and a waiting client exits 3 with it.

The decisions are a pure class, :class:`Detector`; :class:`Healer` is the
Redis and Celery around it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import bootsteps

from workers import connections, keys, results
from workers.batches import batch_task_id, header_args, slice_ref, unpack

logger = logging.getLogger(__name__)

#: Seconds between two cycles of the healer.
INTERVAL_S = 1.0
#: A job that has not moved for this long is scanned for lost batches.
STALL_S = 5.0
#: Every job with batches not done is scanned at least this often, moving or not.
SWEEP_S = 10.0
#: A batch must be missing from every place in two scans this far apart to count as lost.
CONFIRM_S = 3.0
#: A batch sent again is not sent again before this long (it is in the queue meanwhile).
RESEND_GRACE_S = 30.0
#: The leader's lease: another worker takes over this long after the leader stopped renewing.
LEASE_S = 10.0
#: The most jobs one cycle looks at (the oldest first).
MAX_JOBS = 1000
#: A cancel's purge not reported this long after it took its batches is reported by the healer.
PURGE_GRACE_S = 30.0
#: The most queued messages the healer looks at, each cycle, to take a stopped job's batches off
#: the queue (one purge step: a cancel whose process died part-way, or a failure budget's stop).
PURGE_STEP = 1_000
#: Stands for a job's chord callback where batch indexes are listed (it has no index).
CALLBACK = -1
#: A job is scanned again no sooner than this many times the last scan's duration (a scan blocks Redis).
SCAN_SHARE = 50
#: A queue longer than this is not scanned: a scan reads about 200,000 messages a second, blocking Redis.
SCAN_LIMIT = 250_000

# Which of the given batches (by group: the batch indexes, -1 for the chord callback,
# which has no index) are in none of the queue and kombu's unacked hash.  Reads until
# every batch asked for is found, so a scan that finds nothing lost often stops early.
# Returns a JSON object, group -> the indexes not found; {"-1": true} if the queue is
# too long to read.
SCAN_LUA = """
local queue, unacked, limit = KEYS[1], KEYS[2], tonumber(ARGV[1])
local asked = cjson.decode(ARGV[2])
local want, left = {}, 0
for group, indexes in pairs(asked) do
  want[group] = {}
  for _, index in ipairs(indexes) do want[group][tostring(index)] = true; left = left + 1 end
end
-- Plain finds (memchr): the base64 body before the headers holds no quote to stop at.
local function after(raw, name)
  local _, e = string.find(raw, '"' .. name .. '": ', 1, true)
  if not e then _, e = string.find(raw, '"' .. name .. '":', 1, true) end
  return e and e + 1
end
local function look(raw)
  local at = after(raw, 'group')
  local group = at and string.match(raw, '^"([^"]+)"', at)
  local batches = group and want[group]
  if batches then
    local ai = after(raw, 'group_index')
    local index = (ai and string.match(raw, '^(%d+)', ai)) or '-1'
    if batches[index] then batches[index] = nil; left = left - 1 end
  end
end
local n = redis.call('LLEN', queue)
if n > limit then return cjson.encode({["-1"] = true}) end
for _, raw in ipairs(redis.call('HVALS', unacked)) do look(raw) end
local i = 0
while left > 0 and i < n do
  for _, raw in ipairs(redis.call('LRANGE', queue, i, i + 999)) do look(raw) end
  i = i + 1000
end
local unseen = {}
for group, batches in pairs(want) do
  local list = {}
  for index, _ in pairs(batches) do list[#list + 1] = tonumber(index) end
  if #list > 0 then unseen[group] = list end
end
return cjson.encode(unseen)
"""

# Take the lease if it is free, renew it if it is ours; 1 if we hold it now.
LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Unhealable(Exception):
    """A lost batch that cannot be sent again (its inputs are gone)."""


@dataclass(frozen=True)
class Recipe:
    """How to send a job's batches again: read from the job's record (orchestrator/send.py)."""

    job_id: str
    group_id: str
    task: str  # the header task's name
    total: int
    batch_size: int
    batches: int
    queue: str
    #: The header arguments after (start, items): the job's kwargs, and its results location.
    tail: tuple[Any, ...]
    #: The chord callback, as every header message carries it.
    callback: dict[str, Any]
    limits: tuple[int | None, int | None]
    #: Where the job's items are kept: "redis" (compressed, keys.inputs), "range" (low, high), "files",
    #: or "chunks" (a streamed job's: its batches' bounds are in keys.starts).
    inputs: str
    where: str | None = None
    low: int = 0
    sent_at: float = 0.0
    #: Items per input chunk of a streamed job.
    chunk: int = 0

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Recipe | None:
        """The recipe in a job's record, or None if the job cannot be sent again (sent by an old client)."""
        heal = record.get("heal")
        if not isinstance(heal, dict):
            return None
        spec = record.get("spec") or {}
        where = spec.get("where")
        if where and spec.get("chunk"):
            inputs, low = "chunks", 0
        elif where and spec.get("range"):
            inputs, low = "range", int(spec["range"][0])
        elif where:
            inputs, low = "files", 0
        else:
            inputs, low = "redis", 0
        hard, soft = heal.get("limits") or (None, None)
        return cls(
            job_id=str(record["job_id"]),
            group_id=str(record["group_id"]),
            task=str(heal["task"]),
            total=int(record["total"]),
            batch_size=int(record["batch_size"]),
            batches=int(record["batches"]),
            queue=str(heal["queue"]),
            tail=tuple(heal.get("tail") or ()),
            callback=dict(heal["callback"]),
            limits=(hard, soft),
            inputs=inputs,
            where=str(where) if where else None,
            low=low,
            sent_at=float(record.get("sent_at") or 0.0),
            chunk=int(spec.get("chunk") or 0),
        )

    @property
    def callback_queue(self) -> str:
        """The queue the chord sends its callback to (the job's own unless routed elsewhere)."""
        options = self.callback.get("options") or {}
        return str(options.get("queue") or self.queue)

    def bounds(self, index: int, starts: bytes | None = None) -> tuple[int, int]:
        """Batch ``index``'s first item and the one after its last: from its size, or for a streamed
        job from ``starts`` (its bytes of keys.starts: its own start, and the next batch's if any)."""
        if self.inputs != "chunks":
            start = index * self.batch_size
            return start, min(self.total, start + self.batch_size)
        if not starts or len(starts) < 8:
            raise Unhealable("where its batches start is no longer in Redis (expired, flushed or lost)")
        start = int.from_bytes(starts[:8], "big")
        return start, int.from_bytes(starts[8:16], "big") if len(starts) >= 16 else self.total

    def items_of(self, index: int, kept: Sequence[Any] | None, starts: bytes | None = None) -> Any:
        """Batch ``index``'s items as its header message carries them (``kept``: the job's inputs)."""
        start, stop = self.bounds(index, starts)
        count = stop - start
        if self.inputs == "chunks":
            assert self.where is not None
            return slice_ref(self.where, start, stop, self.chunk)
        if self.inputs == "range":
            return {"range": [self.low + start, self.low + start + count]}
        if self.inputs == "files":
            assert self.where is not None
            return {"url": results.input_url(self.where, start), "count": count}
        if kept is None:
            raise Unhealable("its inputs are no longer in Redis (expired, flushed or lost)")
        return list(kept[start : start + count])


def missing_batches(bitmap: bytes | None, batches: int) -> list[int]:
    """The batch indexes in ``0..batches-1`` whose bit is not set (Redis bit order: MSB first)."""
    data = bitmap or b""
    missing: list[int] = []
    for byte_index in range(math.ceil(batches / 8)):
        byte = data[byte_index] if byte_index < len(data) else 0
        if byte == 0xFF:
            continue
        for bit in range(8):
            index = byte_index * 8 + bit
            if index < batches and not byte & (0x80 >> bit):
                missing.append(index)
    return missing


@dataclass
class _Watch:
    """What the detector remembers of one job between cycles."""

    done: int = -1
    moved_at: float = 0.0
    #: Batches found in no place, and when first found so.
    suspects: dict[int, float] = field(default_factory=dict)
    #: Batches sent again, and when.
    resent: dict[int, float] = field(default_factory=dict)
    scanned_at: float = -math.inf


class Detector:
    """Decides, from what the healer reads, which jobs to scan and which batches are lost.  Pure."""

    def __init__(
        self, stall_s: float = STALL_S, sweep_s: float = SWEEP_S, confirm_s: float = CONFIRM_S
    ) -> None:
        self.stall_s, self.sweep_s, self.confirm_s = stall_s, sweep_s, confirm_s
        #: The least time between two scans of a job, besides the above: a long queue takes a
        #: while to read, and Redis does nothing else meanwhile (set from the last scan's duration).
        self.gap = 0.0
        self.watches: dict[str, _Watch] = {}

    def observe(self, job_id: str, pending: Sequence[int], done: int, now: float) -> bool:
        """Note that ``done`` of ``job_id``'s batches are done and ``pending`` are not (or the
        callback, :data:`CALLBACK`, once every batch is); True if the job is due for a scan."""
        watch = self.watches.setdefault(job_id, _Watch(moved_at=now))
        if done != watch.done:
            watch.done, watch.moved_at = done, now
        if not pending:
            watch.suspects.clear()
            return False
        if watch.suspects:  # the scan that confirms them (or clears them), when it can
            return now >= min(
                max(since + self.confirm_s, watch.resent.get(index, -math.inf) + RESEND_GRACE_S)
                for index, since in watch.suspects.items()
            )
        since_scan = now - watch.scanned_at
        if now - watch.moved_at >= self.stall_s and since_scan >= max(self.stall_s, self.gap):
            return True
        return since_scan >= max(self.sweep_s, self.gap)

    def lost(self, job_id: str, gone: Iterable[int], now: float) -> list[int]:
        """Batches confirmed lost by this scan, which found ``gone`` in no place: those also gone
        from every place in the scans of the last ``confirm_s``."""
        watch = self.watches.setdefault(job_id, _Watch(moved_at=now))
        watch.scanned_at = now
        watch.suspects = {i: watch.suspects.get(i, now) for i in gone}
        return [
            i
            for i, since in sorted(watch.suspects.items())
            if now - since >= self.confirm_s and now - watch.resent.get(i, -math.inf) >= RESEND_GRACE_S
        ]

    def resent(self, job_id: str, indexes: Iterable[int], now: float) -> None:
        watch = self.watches.setdefault(job_id, _Watch(moved_at=now))
        for index in indexes:
            watch.resent[index] = now
            watch.suspects.pop(index, None)

    def forget(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.watches.pop(job_id, None)


def scan(
    client: Any, queue: str, unacked: str, asked: Mapping[str, Sequence[int]]
) -> dict[str, set[int]] | None:
    """Which of the batches ``asked`` (group -> indexes) are in neither ``queue`` nor ``unacked``.

    None if the queue is longer than SCAN_LIMIT messages.
    """
    raw = client.eval(
        SCAN_LUA, 2, queue, unacked, SCAN_LIMIT, json.dumps({g: list(i) for g, i in asked.items()})
    )
    unseen = json.loads(raw)
    if unseen.get("-1") is True:
        return None
    return {group: set(unseen.get(group) or ()) for group in asked}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Healer:
    """One worker's healer: leads when it holds the lease, and heals every active job."""

    def __init__(self, app: Any, name: str, detector: Detector | None = None) -> None:
        self.app = app
        self.name = f"{name}:{uuid.uuid4().hex[:8]}"
        self.detector = detector or Detector()
        self.kept: dict[str, list[Any] | None] = {}  # job id -> its inputs, read once
        self._connection: Any = None
        self.given_up: set[str] = set()  # jobs marked unhealable
        self.recipes: dict[str, Recipe | None] = {}  # job id -> how to heal it, read once
        self._broker: Any = None
        #: Stopped jobs the healer is taking off the queue: (messages queued at its first step, looked at).
        self.purging: dict[str, tuple[int, int]] = {}

    @property
    def client(self) -> Any:
        return connections.backend(self.app)

    def lead(self) -> bool:
        return bool(self.client.eval(LEASE_LUA, 1, keys.HEALER, self.name, int(LEASE_S * 1000)))

    def step_down(self) -> None:
        """Give the lease back (a warm shutdown), so another worker leads at once."""
        client = self.client
        if _text(client.get(keys.HEALER) or b"") == self.name:
            client.delete(keys.HEALER)

    def cycle(self, now: float | None = None) -> list[tuple[str, int]]:
        """One look at every active job; returns the (job id, batch index) pairs sent again."""
        if not self.lead():
            return []
        now = time.monotonic() if now is None else now
        jobs = self._active_jobs()
        if not jobs:
            return []
        client = self.client
        with client.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.get(keys.done(job.group_id))
                pipe.hgetall(keys.purges(job.group_id))
                pipe.get(keys.stop(job.group_id))
            replies = pipe.execute()
        bitmaps, purges, stops = replies[0::3], replies[1::3], replies[2::3]
        for job, started in zip(jobs, purges, strict=True):
            self._finish_purges(job, started)
        for job, bitmap, stop in zip(jobs, bitmaps, stops, strict=True):
            if stop and missing_batches(bitmap, job.batches):
                self._purge(job, _text(stop))
        due: dict[str, list[tuple[Recipe, list[int]]]] = {}
        for job, bitmap, started in zip(jobs, bitmaps, purges, strict=True):
            missing = missing_batches(bitmap, job.batches)
            # Every batch done and no outcome yet: the callback is what must be somewhere
            # (unless a cancel has yet to report the batches it took: see _finish_purges).
            pending = missing or ([] if started else [CALLBACK])
            if self.detector.observe(job.job_id, pending, job.batches - len(missing), now):
                due.setdefault(job.queue, []).append((job, pending))
        healed: list[tuple[str, int]] = []
        for queue, watched in due.items():
            # The callback may be routed elsewhere: its queue is looked at too.
            queues = sorted({queue} | {job.callback_queue for job, _ in watched})
            asked = {job.group_id: pending for job, pending in watched}
            gone: dict[str, set[int]] = {group: set(indexes) for group, indexes in asked.items()}
            for name in queues:
                began = time.monotonic()
                unseen = scan(self._broker_client(), name, self._unacked_key(), asked)
                # Scanned no more than 1/SCAN_SHARE of the time, however long the queue.
                self.detector.gap = SCAN_SHARE * (time.monotonic() - began)
                if unseen is None:
                    logger.warning("queue %s is too long to scan (over %d messages)", name, SCAN_LIMIT)
                    break
                for group_id in gone:  # found in any of the queues: not gone
                    gone[group_id] &= unseen[group_id]
            else:
                for job, _ in watched:
                    lost = self.detector.lost(job.job_id, sorted(gone[job.group_id]), now)
                    if lost:
                        healed.extend((job.job_id, index) for index in self.heal(job, lost, now))
        return healed

    def heal(self, job: Recipe, lost: Sequence[int], now: float) -> list[int]:
        """Send batches ``lost`` of ``job`` again; mark the job unhealable if they cannot be."""
        kept = self._inputs(job) if job.inputs == "redis" else None
        sent: list[int] = []
        try:
            if list(lost) == [CALLBACK]:
                lost = self._callback_lost(job)
            for index in lost:
                starts = self._starts(job, index)
                self._send(job, index, kept, starts)
                sent.append(index)
                start, stop = job.bounds(index, starts)
                logger.warning(
                    "healing job %s: batch %d (items %d..%d) was in no queue, not unacknowledged and "
                    "not done for %.0f s (Redis dropped its message); sent again",
                    job.job_id, index, start, stop - 1, CONFIRM_S,
                )  # fmt: skip
        except Unhealable as exc:
            self.given_up.add(job.job_id)  # said once; the waiting client reads it
            reason = (
                f"batch {lost[len(sent)]} of job {job.job_id} was lost by Redis and cannot be sent "
                f"again: {exc}"
            )
            logger.error("%s", reason)
            self.client.set(keys.unhealable(job.job_id), reason, ex=int(self.app.backend.expires or 86_400))
        if sent:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.incrby(keys.healed(job.job_id), len(sent))
                pipe.expire(keys.healed(job.job_id), int(self.app.backend.expires or 86_400))
                pipe.execute()
            self.detector.resent(job.job_id, sent, now)
        return sent

    def _finish_purges(self, job: Recipe, started: Mapping[bytes, bytes]) -> None:
        """Report the purges (a cancel's) whose process died before it reported them."""
        for purge_id, at in started.items():
            if time.time() - float(at) < PURGE_GRACE_S:
                continue
            from workers.fanin import CANCELLED
            from workers.purge import finish_purge

            reason = _text(self.client.get(keys.stop(job.group_id)) or CANCELLED.encode())
            count = finish_purge(self.app, job.group_id, _text(purge_id), reason)
            logger.warning(
                "healing job %s: a cancel took %d batches off the queue %.0f s ago and never reported "
                "them; reported now as %r",
                job.job_id, count, time.time() - float(at), reason,
            )  # fmt: skip

    def _purge(self, job: Recipe, reason: str) -> None:
        """Take a stopped job's queued batches off its queue, a step (PURGE_STEP messages) a cycle.

        A cancel purges the queue itself; this finishes the purge of a cancel whose
        process died part-way, and purges for a failure budget, which a header task
        sets from inside a batch (where a purge of any size would hold up the batch's
        own report).  One pass over the queue as it was at the first step, then no more.
        """
        from workers.purge import purge_step

        queued, looked_at = self.purging.get(job.job_id, (-1, 0))
        if 0 <= queued <= looked_at:
            return  # looked at the whole queue once: what is left drains through the workers
        length, taken = purge_step(self.app, job.queue, job.group_id, reason, PURGE_STEP)
        queued = length if queued < 0 else queued
        self.purging[job.job_id] = (queued, looked_at + min(length, PURGE_STEP))
        if taken:
            logger.warning("job %s stopped (%s): took %d queued batches off", job.job_id, reason, taken)

    def _callback_lost(self, job: Recipe) -> list[int]:
        """The batches to send again when every batch is done but the callback is nowhere.

        While the chord still holds the parts (the worker that was to send the callback
        died first), a copy of one batch is enough: counted once, its report finds the
        chord complete and sends the callback.  Once the chord has sent it (its parts
        went with the message, and Redis dropped that), the whole job runs again on a
        fresh chord: the only way back to the parts.
        """
        backend = self.app.backend
        claim_key = backend.get_key_for_group(job.group_id, ".c")
        size_key = backend.get_key_for_group(job.group_id, ".s")
        claim, size = self.client.mget(claim_key, size_key)
        if size is not None and claim != b"done":
            logger.warning(
                "healing job %s: every batch is done but its callback was never sent; "
                "sending batch 0 again so that the chord sends it",
                job.job_id,
            )
            return [0]
        logger.error(
            "healing job %s: its callback (and the results it carried) was lost after the chord "
            "sent it; running all %d batches again",
            job.job_id, job.batches,
        )  # fmt: skip
        with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(keys.done(job.group_id), claim_key)
            pipe.execute()
        backend.set_chord_size(job.group_id, job.batches)
        return list(range(job.batches))

    def _starts(self, job: Recipe, index: int) -> bytes | None:
        """A streamed job's bytes of keys.starts for batch ``index`` (its start and the next's)."""
        if job.inputs != "chunks":
            return None
        raw: bytes = self.client.getrange(keys.starts(job.job_id), 8 * index, 8 * index + 15)
        return raw

    def _send(self, job: Recipe, index: int, kept: Sequence[Any] | None, starts: bytes | None = None) -> None:
        hard, soft = job.limits
        self.app.send_task(
            job.task,
            args=header_args(job.bounds(index, starts)[0], job.items_of(index, kept, starts), job.tail),
            task_id=batch_task_id(job.job_id, index),
            group_id=job.group_id,
            group_index=index,
            chord=job.callback,
            queue=job.queue,
            time_limit=hard,
            soft_time_limit=soft,
            ignore_result=True,
        )

    def _inputs(self, job: Recipe) -> list[Any] | None:
        if job.job_id not in self.kept:
            raw = self.client.get(keys.inputs(job.job_id))
            self.kept[job.job_id] = unpack(raw) if raw else None
        return self.kept[job.job_id]

    def _active_jobs(self) -> list[Recipe]:
        """The jobs not yet fanned in; those fanned in, expired or flushed leave the index.

        Two EXISTS a job and cycle; a job's record (its recipe, which can be large) is
        read once.  The callback stores its state only once it has run (no STARTED):
        a state there means the fan-in is over.
        """
        client = self.client
        ids = [_text(i) for i in client.zrange(keys.ACTIVE, 0, MAX_JOBS - 1)]
        if not ids:
            return []
        backend = self.app.backend
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                if job_id in self.recipes:
                    pipe.exists(keys.job(job_id))
                else:
                    pipe.get(keys.job(job_id))
                pipe.exists(backend.get_key_for_task(job_id))
            replies = pipe.execute()
        jobs: list[Recipe] = []
        finished: list[str] = []
        for k, job_id in enumerate(ids):
            record, ended = replies[2 * k], replies[2 * k + 1]
            if not record or ended:
                finished.append(job_id)
                continue
            if job_id not in self.recipes:
                self.recipes[job_id] = Recipe.from_record(json.loads(record))
            recipe = self.recipes[job_id]
            if recipe is not None and job_id not in self.given_up:
                jobs.append(recipe)
        if finished:
            client.zrem(keys.ACTIVE, *finished)
            self.detector.forget(finished)
            for job_id in finished:
                self.kept.pop(job_id, None)
                self.recipes.pop(job_id, None)
                self.given_up.discard(job_id)
                self.purging.pop(job_id, None)
        return jobs

    def _broker_client(self) -> Any:
        """The broker's Redis, where the queue and the unacked hash are: kombu's channel client."""
        if self._broker is None:
            self._connection = self.app.connection_for_read()
            self._broker = self._connection.default_channel.client
        return self._broker

    def _unacked_key(self) -> str:
        options = self.app.conf.broker_transport_options or {}
        return str(options.get("unacked_key", "unacked"))


class Healing(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: run a healer cycle every INTERVAL_S while the worker consumes.

    On the consumer's timer, in the worker's main thread, like the registration:
    no thread of its own that a pool process forked later could inherit mid-lock.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self.timer_entry: Any = None
        self.healer: Healer | None = None

    def start(self, consumer: Any) -> None:
        if self.healer is None:
            self.healer = Healer(consumer.app, consumer.hostname)
        self.timer_entry = consumer.timer.call_repeatedly(INTERVAL_S, self.cycle, priority=20)

    def cycle(self) -> None:
        assert self.healer is not None
        try:
            self.healer.cycle()
        except Exception as exc:  # noqa: BLE001 - the healer must outlive a Redis outage
            logger.warning("healer: cycle failed (%s); trying again in %.0f s", exc, INTERVAL_S)

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)
        if self.healer is not None:
            try:
                self.healer.step_down()
            except Exception as exc:  # noqa: BLE001 - the lease expires on its own
                logger.warning("healer: could not give up the lease: %s", exc)
