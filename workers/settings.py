"""fanout's configuration: one frozen object, read from the environment once."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from workers.errors import ConfigError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: The values FANOUT_LOG_FORMAT takes (workers/logs.py), the default first.
LOG_FORMATS = ("human", "json")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket", "sentinel")
#: ``ssl_cert_reqs`` as redis-py spells it, from every spelling Celery and kombu accept.
_CERT_REQS = {
    "required": "required",
    "cert_required": "required",
    "optional": "optional",
    "cert_optional": "optional",
    "none": "none",
    "cert_none": "none",
}
#: The TLS parameters a ``rediss://`` URL may carry in its query string.
_TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def cert_reqs(name: str, value: str) -> str:
    """``value`` as redis-py spells it (``required``, ``optional``, ``none``).

    Celery's and kombu's documentation write ``CERT_REQUIRED``; redis-py's own
    clients accept only ``required``.  Both are taken here, so one URL serves all three.
    """
    normal = _CERT_REQS.get(value.strip().lower())
    if normal is None:
        raise ConfigError(
            f"{name}: ssl_cert_reqs={value!r} is not one of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE "
            "(or required, optional, none)"
        )
    return normal


@dataclass(frozen=True)
class SentinelUrl:
    """A ``sentinel://h1:26379;sentinel://h2:26379/0`` URL, taken apart."""

    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def url(self) -> str:
        """The URL with the credentials and the database on every Sentinel, as kombu and Celery read it.

        kombu reads the database and password from the first Sentinel's URL and
        Celery from the first host's, while users often write the database on the
        last one only (``sentinel://h1;sentinel://h2/0``).
        """
        auth = ""
        if self.password is not None or self.username is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.hosts)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: for error messages."""
    return re.sub(r"(://[^:@/;]*:)[^@/;]*@", r"\1***@", url)


def parse_sentinel_url(name: str, url: str) -> SentinelUrl:
    """Take a ``sentinel://`` URL apart, or raise ConfigError naming ``name``."""
    hosts: list[tuple[str, int]] = []
    dbs: set[int] = set()
    users: set[str] = set()
    passwords: set[str] = set()
    for chunk in url.split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        try:
            parts = urlsplit(chunk)
            port = parts.port or 26379
        except ValueError as exc:
            raise ConfigError(f"{name}: {_redacted(chunk)!r} is not a valid URL: {exc}") from None
        if parts.scheme != "sentinel":
            raise ConfigError(
                f"{name}: {_redacted(chunk)!r} is not a Sentinel; write each Sentinel as "
                "sentinel://host:port, separated by ';' (sentinel://h1:26379;sentinel://h2:26379/0)"
            )
        if not parts.hostname:
            raise ConfigError(f"{name}: {_redacted(chunk)!r} names no host")
        if parts.query or parts.fragment:
            raise ConfigError(
                f"{name}: {_redacted(chunk)!r}: a Sentinel URL takes no options; TLS to the Sentinels is "
                "FANOUT_SENTINEL_TLS=1 with FANOUT_SENTINEL_TLS_CA_CERTS=..., see docs/configuration.md"
            )
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(
                    f"{name}: {_redacted(chunk)!r}: the database must be a number (/0), not {path!r}"
                )
            dbs.add(int(path))
        if parts.username:
            users.add(unquote(parts.username))
        if parts.password is not None:
            passwords.add(unquote(parts.password))
        hosts.append((parts.hostname, port))
    if not hosts:
        raise ConfigError(f"{name}={_redacted(url)!r} names no Sentinel")
    for what, values in (("databases", dbs), ("user names", users), ("passwords", passwords)):
        if len(values) > 1:
            shown = sorted(str(v) for v in values) if what == "databases" else ["..."]
            raise ConfigError(
                f"{name}: the Sentinels give different {what} ({', '.join(shown)}); "
                "they all point at one master, so give it once or the same on each"
            )
    return SentinelUrl(
        hosts=tuple(hosts),
        db=dbs.pop() if dbs else 0,
        username=users.pop() if users else None,
        password=passwords.pop() if passwords else None,
    )


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def check_redis_url(name: str, url: str) -> str:
    """``url`` as fanout uses it, if it is a Redis URL, else raise ConfigError naming ``name``.

    A ``sentinel://`` URL comes back with its database and credentials on every
    Sentinel; a ``rediss://`` URL with ``ssl_cert_reqs`` as redis-py spells it
    (``required`` when absent: verification is on unless the URL turns it off).
    """
    url = url.strip()
    if is_sentinel(url):
        return parse_sentinel_url(name, url).url()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{name}={_redacted(url)!r} is not a valid URL: {exc}") from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(
            f"{name}={_redacted(url)!r}: expected a Redis URL "
            f"({', '.join(s + '://' for s in _REDIS_SCHEMES)})"
        )
    if parts.scheme in ("redis", "rediss") and not parts.hostname:
        raise ConfigError(f"{name}={_redacted(url)!r}: the URL names no host")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.scheme == "redis" and any(key in _TLS_PARAMS for key, _ in query):
        raise ConfigError(f"{name}: TLS options ({', '.join(_TLS_PARAMS)}) need a rediss:// URL")
    if parts.scheme == "rediss":
        query = [(k, cert_reqs(name, v) if k == "ssl_cert_reqs" else v) for k, v in query]
        if not any(key == "ssl_cert_reqs" for key, _ in query):
            query.append(("ssl_cert_reqs", "required"))
        url = urlunsplit(parts._replace(query=urlencode(query, safe="/")))
    return url


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "no", "false", "off"):
        return False
    if raw in ("1", "yes", "true", "on"):
        return True
    raise ConfigError(f"{name}={env.get(name)!r}: expected 1 or 0")


@dataclass(frozen=True)
class Tls:
    """TLS to the Sentinels and to the master they name (``FANOUT_SENTINEL_TLS_*``)."""

    #: ``required``, ``optional`` or ``none``, as redis-py spells it.
    cert_reqs: str = "required"
    #: The CA bundle that signed the servers' certificates (None: the system's).
    ca_certs: str | None = None
    #: A client certificate and its key, for a Redis that asks for one (tls-auth-clients).
    certfile: str | None = None
    keyfile: str | None = None

    def redis_kwargs(self) -> dict[str, Any]:
        """The ``ssl_*`` keyword arguments of a redis-py connection, as kombu and Celery take them too."""
        kwargs: dict[str, Any] = {"ssl_cert_reqs": self.cert_reqs}
        for key, value in (
            ("ssl_ca_certs", self.ca_certs),
            ("ssl_certfile", self.certfile),
            ("ssl_keyfile", self.keyfile),
        ):
            if value:
                kwargs[key] = value
        return kwargs


def _tls(env: Mapping[str, str]) -> Tls | None:
    """The Sentinel TLS options, None unless FANOUT_SENTINEL_TLS is on."""
    names = {
        "ca_certs": "FANOUT_SENTINEL_TLS_CA_CERTS",
        "certfile": "FANOUT_SENTINEL_TLS_CERTFILE",
        "keyfile": "FANOUT_SENTINEL_TLS_KEYFILE",
    }
    given = {key: (env.get(var) or "").strip() or None for key, var in names.items()}
    reqs = (env.get("FANOUT_SENTINEL_TLS_CERT_REQS") or "").strip()
    if not _flag(env, "FANOUT_SENTINEL_TLS"):
        stray = [names[k] for k, v in given.items() if v]
        stray += ["FANOUT_SENTINEL_TLS_CERT_REQS"] if reqs else []
        if stray:
            raise ConfigError(f"{', '.join(stray)} given without FANOUT_SENTINEL_TLS=1")
        return None
    if bool(given["certfile"]) != bool(given["keyfile"]):
        raise ConfigError("FANOUT_SENTINEL_TLS_CERTFILE and FANOUT_SENTINEL_TLS_KEYFILE go together")
    return Tls(
        cert_reqs=cert_reqs("FANOUT_SENTINEL_TLS_CERT_REQS", reqs) if reqs else "required",
        ca_certs=given["ca_certs"],
        certfile=given["certfile"],
        keyfile=given["keyfile"],
    )


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


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when unset), case-insensitive."""
    raw = (env.get(name) or "").strip().lower() or choices[0]
    if raw not in choices:
        raise ConfigError(f"{name}={env.get(name)!r}: expected one of {', '.join(choices)}")
    return raw


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
    #: The name of the master the Sentinels watch, for a ``sentinel://`` URL
    #: (``FANOUT_SENTINEL_MASTER``, Sentinel's own default name).
    sentinel_master: str = "mymaster"
    #: The Sentinels' own password (``requirepass`` in sentinel.conf), not Redis's:
    #: Redis's password goes in the URL (``sentinel://:PASSWORD@h1:26379;...``).
    sentinel_password: str | None = None
    #: TLS to the Sentinels and the master they name, None for plain TCP.
    sentinel_tls: Tls | None = None
    #: How workers write their log lines: ``human`` (Celery's format, the batch's job and
    #: items in front) or ``json`` (one object per line, for log shippers); workers/logs.py.
    log_format: str = "human"

    @property
    def uses_sentinel(self) -> bool:
        return is_sentinel(self.broker_url) or is_sentinel(self.result_backend)

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
        master = (env.get("FANOUT_SENTINEL_MASTER") or "").strip() or cls.sentinel_master
        if any(c.isspace() for c in master):
            raise ConfigError(f"FANOUT_SENTINEL_MASTER={master!r}: a master name has no spaces")
        sentinel_password = env.get("FANOUT_SENTINEL_PASSWORD") or None
        tls = _tls(env)
        if (tls is not None or sentinel_password) and not (is_sentinel(broker) or is_sentinel(backend)):
            raise ConfigError(
                "FANOUT_SENTINEL_TLS or FANOUT_SENTINEL_PASSWORD is set, but no Redis URL is a "
                "sentinel:// one (for TLS straight to Redis, use a rediss:// URL)"
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
            sentinel_master=master,
            sentinel_password=sentinel_password,
            sentinel_tls=tls,
            log_format=_choice(env, "FANOUT_LOG_FORMAT", LOG_FORMATS),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
