"""A job's header messages: their task ids and arguments, the same whoever sends them.

The client sends every batch of a job once (orchestrator/canvas.py builds the
chord); the healer (:mod:`workers.healing`) sends a batch again when Redis has
dropped its message.  Both build the message from here, so a batch sent
again is the same batch: the same arguments, and the same task id and index
in the chord, which is what lets the chord count it once (Celery's Redis
backend counts each ``task id:index`` once, whatever each run returned).
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

from workers import results
from workers.errors import BadTask

#: The namespace of header task ids: a batch's id is derived from its job's id and its index.
_NAMESPACE = uuid.UUID("1b5cf3c2-7c39-4a8e-9d0f-6f7c2a4e8b11")


def batch_task_id(job_id: str, index: int) -> str:
    """The task id of batch ``index`` of job ``job_id``: the same every time it is sent.

    For a job id that is a UUID (fanout's own), the job id with its last 48 bits
    replaced by the index: still a UUID, and cheap (a job may have 200,000 batches).
    """
    if len(job_id) == 36 and job_id[23] == "-" and index < 1 << 48:
        return f"{job_id[:24]}{index:012x}"
    return str(uuid.uuid5(_NAMESPACE, f"{job_id}:{index}"))


def items_ref(items: Sequence[Any], start: int, batch_size: int, where: str) -> dict[str, Any]:
    """A batch's items as a header message carries them in a job sent by reference.

    A range of integers travels as its bounds; anything else as the URL of the
    file the client writes before sending (see orchestrator/send.py), with its
    count, so that a header can report every item failed if the file cannot be read.
    """
    if plain_range(items):
        batch = items[start : start + batch_size]
        return {"range": [batch.start, batch.stop]}  # type: ignore[attr-defined]
    return {"url": results.input_url(where, start), "count": len(items[start : start + batch_size])}


def slice_ref(where: str, start: int, stop: int, chunk: int) -> dict[str, Any]:
    """A batch of a streamed job as its header message carries it: items ``start`` .. ``stop - 1``
    of the input chunks under ``where`` (``chunk`` items each), and their count."""
    return {"chunks": where, "slice": [start, stop], "chunk": chunk, "count": stop - start}


def plain_range(items: Sequence[Any]) -> bool:
    return isinstance(items, range) and items.step == 1


def header_args(start: int, items: Any, tail: Sequence[Any]) -> tuple[Any, ...]:
    """A header task's positional arguments: the batch's first index, its items, then the job's
    ``tail`` (its kwargs, and for a job sent by reference its results location)."""
    return (start, items, *tail)


def pack(items: Any) -> bytes:
    """A job's items as kept in Redis (for ``fanout retry`` and the healer): JSON, compressed
    (zlib level 1: fast, and ints shrink ~3x)."""
    return zlib.compress(json.dumps(list(items), separators=(",", ":")).encode(), 1)


def unpack(raw: bytes) -> list[Any]:
    items: list[Any] = json.loads(zlib.decompress(raw))
    return items


def batch_items(items: list[Any] | dict[str, Any]) -> list[Any]:
    """A header message's items: a list, or a reference to them (a job sent by reference).

    ``{"range": [low, high]}`` is the integers ``low .. high-1``; ``{"url": URL}``
    a JSON list the client wrote to the results location before sending;
    ``{"chunks": ...}`` a slice of a streamed job's input chunks (:func:`slice_ref`).
    """
    if isinstance(items, list):
        return items
    if "range" in items:
        low, high = items["range"]
        return list(range(int(low), int(high)))
    if "chunks" in items:
        low, high = items["slice"]
        return results.read_slice(str(items["chunks"]), int(low), int(high), int(items["chunk"]))
    listed = results.read_json(str(items["url"]))
    if not isinstance(listed, list):
        raise BadTask(f"the items at {items['url']} are not a JSON list")
    return listed
