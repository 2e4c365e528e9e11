"""fanout's configuration: one frozen object, read from the environment once."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from workers.errors import ConfigError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket")


def check_redis_url(name: str, url: str) -> str:
    """Return ``url`` if it is a Redis URL, else raise ConfigError naming ``name``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{name}={url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(
            f"{name}={url!r}: expected a Redis URL ({', '.join(s + '://' for s in _REDIS_SCHEMES)})"
        )
    if parts.scheme in ("redis", "rediss") and not parts.hostname:
        raise ConfigError(f"{name}={url!r}: the URL names no host")
    return url


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _modules(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of dotted module names."""
    modules = tuple(m.strip() for m in (env.get(name) or "").split(",") if m.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"{name}: {module!r} is not a dotted module name (e.g. myjobs or pkg.tasks)")
    return modules


def _queue(env: Mapping[str, str], name: str, default: str) -> str:
    queue = (env.get(name) or "").strip() or default
    if any(c.isspace() or c == "," for c in queue):
        raise ConfigError(f"{name}={queue!r}: a queue name has no spaces or commas")
    return queue


@dataclass(frozen=True)
class Settings:
    """Everything fanout reads from the environment.

    ``FANOUT_REDIS_URL`` serves as broker and result backend; the two can be
    split with ``FANOUT_BROKER_URL`` and ``FANOUT_RESULT_BACKEND``.
    """

    broker_url: str = DEFAULT_REDIS_URL
    result_backend: str = DEFAULT_REDIS_URL
    #: Seconds a finished run's results stay in Redis.
    result_expires: int = 86_400
    #: Hard per-task limit, seconds: the pool child is killed past it.  A batch
    #: is sized to take seconds, so 30 s only ever stops a stuck one.  Celery
    #: writes the sender's limits into each message, so the orchestrator's value
    #: is the one a worker applies: keep it the same on every machine.
    task_time_limit: int = 30
    #: Seconds an unacknowledged message stays invisible before Redis hands it
    #: to another worker: how long the work of a worker that died unannounced
    #: (kill -9, power loss, network cut) waits before it is redone elsewhere.
    #: It must exceed the longest a message can be legitimately held unacked, a
    #: wait for a free pool process plus a run, both bounded by the time limit,
    #: or a slow but healthy task would run twice at once; so the default is
    #: ``2 * task_time_limit + 15``, at least 75.  Kept this low, a worker's loss
    #: costs under 2 minutes (75 s + one restore sweep + the rerun) instead of
    #: Celery's hour; the price is that a task must never outlive the time limit
    #: (the limit enforces that).
    visibility_timeout: int = 75
    #: Seconds between a worker's sweeps for messages past the visibility timeout.
    restore_interval: int = 5
    #: Seconds to wait for a TCP connection to Redis before giving up.
    connect_timeout: float = 3.0
    #: Modules of the user's that a worker imports at start-up, so it has their
    #: ``@fanout.task`` functions (``FANOUT_IMPORTS=myjobs,other.module``).
    imports: tuple[str, ...] = ()
    #: The queue fanout's tasks go to and its workers consume: a queue of its own,
    #: so another Celery app on the same Redis database never takes fanout's
    #: messages, nor fanout's workers its (``FANOUT_QUEUE``).
    queue: str = "fanout"
    #: Where jobs sent by reference keep their parts and outcome (a directory, or
    #: an fsspec URL such as s3://bucket/prefix): None is a directory in this
    #: machine's temporary directory, or, for resize, next to the outputs.  Workers on
    #: other machines must reach the same location (s3, or a shared directory).
    results_url: str | None = None
    #: Jobs of at least this many items go by reference: their results travel through
    #: the results location, not Redis, so Redis and every process stay small
    #: whatever the job's size (below it, a job's parts are small enough for Redis,
    #: and a few files per job would cost more than they save).
    by_reference_items: int = 200_000
    #: After the writes a job cannot do without (a batch's part, a job's record and inputs,
    #: its outcome), wait for this many replicas to have them (Redis WAIT), so that a
    #: failover to a replica loses fewer acknowledged writes.  0: do not wait.
    wait_replicas: int = 0
    #: The longest one such wait lasts, milliseconds; a replica that is late is logged,
    #: never an error (WAIT cannot make a write fail, only say how far it got).
    wait_ms: int = 100

    @property
    def results_root(self) -> str:
        """The results location, the default one if FANOUT_RESULTS_URL is not set."""
        return self.results_url or os.path.join(tempfile.gettempdir(), "fanout-results")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        redis_url = check_redis_url("FANOUT_REDIS_URL", env.get("FANOUT_REDIS_URL") or DEFAULT_REDIS_URL)
        broker = check_redis_url("FANOUT_BROKER_URL", env.get("FANOUT_BROKER_URL") or redis_url)
        backend = check_redis_url("FANOUT_RESULT_BACKEND", env.get("FANOUT_RESULT_BACKEND") or redis_url)
        time_limit = _int(env, "FANOUT_TASK_TIME_LIMIT", cls.task_time_limit)
        visibility = _int(env, "FANOUT_VISIBILITY_TIMEOUT", max(cls.visibility_timeout, 2 * time_limit + 15))
        if visibility <= time_limit:
            raise ConfigError(
                f"FANOUT_VISIBILITY_TIMEOUT={visibility} must exceed "
                f"FANOUT_TASK_TIME_LIMIT={time_limit}, or a running task would be "
                "handed to a second worker"
            )
        return cls(
            broker_url=broker,
            result_backend=backend,
            result_expires=_int(env, "FANOUT_RESULT_EXPIRES", cls.result_expires),
            task_time_limit=time_limit,
            visibility_timeout=visibility,
            restore_interval=_int(env, "FANOUT_RESTORE_INTERVAL", cls.restore_interval),
            imports=_modules(env, "FANOUT_IMPORTS"),
            queue=_queue(env, "FANOUT_QUEUE", cls.queue),
            results_url=(env.get("FANOUT_RESULTS_URL") or "").strip() or None,
            by_reference_items=_int(env, "FANOUT_BY_REFERENCE_ITEMS", cls.by_reference_items),
            wait_replicas=_int(env, "FANOUT_WAIT_REPLICAS", cls.wait_replicas, minimum=0),
            wait_ms=_int(env, "FANOUT_WAIT_MS", cls.wait_ms),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
