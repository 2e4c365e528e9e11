"""Every Redis connection fanout opens, built in one place from the Settings.

Three kinds of Redis, one URL each (``workers/settings.py`` checks and normalises them):

* ``redis://`` (or a Unix socket): plain TCP;
* ``rediss://...?ssl_cert_reqs=...&ssl_ca_certs=...``: TLS, the options in the URL;
* ``sentinel://h1:26379;sentinel://h2:26379/0``: whichever server the Sentinels
  name as master of ``FANOUT_SENTINEL_MASTER``, with the Sentinels' own password
  and TLS from ``FANOUT_SENTINEL_PASSWORD`` and ``FANOUT_SENTINEL_TLS*``.

Celery and kombu open their own connections (the broker's channel, the result
backend's pool); :func:`celery_options` is what they need to open them the same
way, and fanout's keys go through the result backend's pool (:func:`backend`).
:func:`client` builds the clients fanout opens on its own (the check that Redis
answers, tests).  Through Sentinel every one of them asks the Sentinels for the
master on each new connection, so after a failover they all reconnect to the
promoted replica by themselves.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

import redis
from celery import Celery
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from workers.settings import Settings, is_sentinel, parse_sentinel_url


class FollowingConnection(SentinelManagedConnection):
    """A connection to the master the Sentinels name, that asks them again on every reconnect.

    redis-py (8.2) reconnects a dropped connection inside a command's retries
    through ``connect_check_health``, which keeps the address it had: after a
    failover every retry knocks at the dead master, and a command rides out
    nothing.  Asking the Sentinels first (one ``SENTINEL MASTERS`` per reconnect)
    makes each retry reach the promoted replica.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        pool: Any = self.connection_pool
        if not self._sock and pool.is_master:
            self.host, self.port = pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class FollowingSSLConnection(FollowingConnection, redis.SSLConnection):
    """:class:`FollowingConnection` over TLS."""


def following(connection_class: type[Any] | None) -> type[FollowingConnection]:
    """The following connection class for a Sentinel pool whose class was ``connection_class``."""
    if connection_class is not None and issubclass(connection_class, redis.SSLConnection):
        return FollowingSSLConnection
    return FollowingConnection


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to reach the Sentinels themselves: their password, TLS, and bounded timeouts.

    Always given: without it Celery's result backend connects to the Sentinels
    with no timeout at all (redis-py copies only the ``socket_*`` options when
    the argument is None, and Celery passes ``{}``).
    """
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.connect_timeout,
    }
    if settings.sentinel_password:
        kwargs["password"] = settings.sentinel_password
    if settings.sentinel_tls is not None:
        kwargs.update(ssl=True, **settings.sentinel_tls.redis_kwargs())
    return kwargs


def master_tls(settings: Settings) -> dict[str, Any] | None:
    """The ``ssl_*`` options of connections to a Sentinel-named master, None for plain TCP."""
    return None if settings.sentinel_tls is None else settings.sentinel_tls.redis_kwargs()


def celery_options(settings: Settings) -> dict[str, Any]:
    """What Celery's broker and result backend need beyond their URLs (Sentinel's master and TLS).

    Empty for ``redis://`` and ``rediss://`` URLs: kombu and Celery read those
    URLs' own TLS options (settings.py spells ``ssl_cert_reqs`` so that both do).
    """
    options: dict[str, Any] = {"broker_transport_options": {}, "result_backend_transport_options": {}}
    sentinel = {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs(settings)}
    tls = master_tls(settings)
    if is_sentinel(settings.broker_url):
        options["broker_transport_options"].update(sentinel)
        if tls is not None:
            options["broker_use_ssl"] = tls
    if is_sentinel(settings.result_backend):
        options["result_backend_transport_options"].update(sentinel)
        if tls is not None:
            options["redis_backend_use_ssl"] = tls
    return options


def client(url: str, settings: Settings, **kwargs: Any) -> redis.Redis:
    """A new client of the Redis at ``url`` (plain, TLS, or the master the Sentinels name).

    Connect and read timeouts are the settings' ``connect_timeout`` unless
    ``kwargs`` says otherwise.  Close it with :func:`close`.
    """
    kwargs.setdefault("socket_connect_timeout", settings.connect_timeout)
    kwargs.setdefault("socket_timeout", settings.connect_timeout)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url("the Redis URL", url)
    master_kwargs: dict[str, Any] = {"db": parsed.db, **kwargs}
    if parsed.username is not None:
        master_kwargs["username"] = parsed.username
    if parsed.password is not None:
        master_kwargs["password"] = parsed.password
    tls = master_tls(settings)
    if tls is not None:
        master_kwargs.update(tls)
    master_kwargs["connection_class"] = FollowingSSLConnection if tls is not None else FollowingConnection
    sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=sentinel_kwargs(settings))
    master: redis.Redis = sentinel.master_for(settings.sentinel_master, redis.Redis, **master_kwargs)
    return master


def close(connection: redis.Redis) -> None:
    """Close a client from :func:`client`, and its connections to the Sentinels if it has any."""
    connection.close()
    manager = getattr(connection.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def describe(exc: BaseException) -> str:
    """``exc`` in a line: redis-py names each Sentinel that failed by the whole repr of its client."""
    text = str(exc).rstrip(".")
    if not isinstance(exc, MasterNotFoundError) or " : " not in text:
        return text
    head, _, details = text.partition(" : ")
    reasons = []
    for failure in re.split(r",\s*(?=<redis\.)", details):
        host = re.search(r"[(,]host=([^,)]+)", failure)
        port = re.search(r"[(,]port=(\d+)", failure)
        reason = failure.rpartition(")> - ")[2].strip() or failure
        where = f"{host.group(1)}:{port.group(1)}" if host and port else "a Sentinel"
        reasons.append(f"{where}: {reason.rstrip('.')}")
    return f"{head} ({'; '.join(reasons)})"


def remedy(exc: BaseException) -> str:
    """What to do about ``exc``, an error from connecting to Redis: a sentence for the user."""
    text = str(exc)
    if isinstance(exc, MasterNotFoundError):
        return (
            "No Sentinel named a master: check the Sentinels' addresses, FANOUT_SENTINEL_MASTER, "
            "FANOUT_SENTINEL_PASSWORD and FANOUT_SENTINEL_TLS*."
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            "Redis's TLS certificate did not verify: point ssl_ca_certs in the URL (or "
            "FANOUT_SENTINEL_TLS_CA_CERTS) at the CA that signed it."
        )
    if isinstance(exc.__context__ or exc.__cause__, ssl.SSLError):
        return "The TLS handshake with Redis failed: check that it speaks TLS on that port, and the options."
    return "Start Redis, or point FANOUT_REDIS_URL at a running one."


def backend(app: Celery) -> Any:
    """The client of the result backend's Redis, where fanout keeps its keys (workers/keys.py).

    Celery's own pool, built from :func:`celery_options`: through Sentinel it
    follows the master as the result backend does.  Typed ``Any``, as Celery's
    client is: it never decodes, so every reply is ``bytes`` (redis-py's types
    say ``bytes | str``).
    """
    return app.backend.client
