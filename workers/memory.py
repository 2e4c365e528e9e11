"""A full Redis: recognising it, and saying so in the terms an operator acts on.

Under ``maxmemory`` with ``noeviction`` (as the compose file runs it), Redis
refuses every command that may add memory (``-OOM command not allowed when
used memory > 'maxmemory'``) and keeps serving the rest: reads, deletes, pops.
Nothing is wrong with the workers or the job then; Redis needs room.  This
module names that cause: workers log it while they wait for room
(:mod:`workers.broker`, :mod:`workers.backend`), and the client ends a job
that cannot finish with it (:mod:`orchestrator.room`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

#: Redis's reply to a write it refuses for want of memory (redis-py raises OutOfMemoryError).
OOM_REPLY = "command not allowed when used memory > 'maxmemory'"
#: How close to its maxmemory (or 1 % of it, if more) a Redis counts as full.
FULL_MARGIN_B = 256 * 1024
#: What an operator can do about it, in one sentence.
REMEDY = (
    "raise Redis's maxmemory (CONFIG SET maxmemory, or REDIS_MAXMEMORY in compose), or free "
    "memory (finished jobs' results expire after FANOUT_RESULT_EXPIRES); big jobs can keep "
    "their results out of Redis with FANOUT_BY_REFERENCE_ITEMS"
)


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write because it is at its maxmemory."""
    return isinstance(exc, redis.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and OOM_REPLY in str(exc)
    )


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


@dataclass(frozen=True)
class RedisMemory:
    """Redis's ``INFO memory``: what it uses, its limit (0: none) and what it does at the limit."""

    used: int
    maxmemory: int
    policy: str

    @property
    def free(self) -> int | None:
        """Bytes left under maxmemory (None: no limit; 0: at or past it)."""
        return max(0, self.maxmemory - self.used) if self.maxmemory else None

    @property
    def refuses_writes(self) -> bool:
        """At its limit (give or take FULL_MARGIN) with a policy that refuses writes rather than evicting.

        The margin: a full Redis serves the pops and deletes that free a little memory, so
        at any one look it may be just under its limit, and refuse the next write all the same.
        """
        margin = max(self.maxmemory // 100, FULL_MARGIN_B)
        return bool(self.maxmemory) and self.used >= self.maxmemory - margin and self.policy == "noeviction"

    def __str__(self) -> str:
        if not self.maxmemory:
            return f"used_memory {megabytes(self.used)}, no maxmemory"
        return (
            f"used_memory {megabytes(self.used)} of maxmemory {megabytes(self.maxmemory)} "
            f"(maxmemory-policy {self.policy})"
        )


def read_memory(client: Any) -> RedisMemory | None:
    """``client``'s Redis memory figures, or None if it cannot be asked (down, INFO not allowed)."""
    try:
        info = client.info("memory")
        return RedisMemory(
            used=int(info["used_memory"]),
            maxmemory=int(info.get("maxmemory") or 0),
            policy=str(info.get("maxmemory_policy") or "noeviction"),
        )
    except (redis.RedisError, OSError, KeyError, TypeError, ValueError):
        return None


def full_message(client: Any, doing: str) -> str:
    """One line for a write refused while ``doing``: Redis's figures, if it answers, and the remedy."""
    memory = read_memory(client)
    figures = f" ({memory})" if memory is not None else ""
    return f"Redis is full{figures}: it refused a write while {doing}"
