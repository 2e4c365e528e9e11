"""The one Celery app.  ``celery -A workers worker`` and ``celery -A workers flower`` find it here."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun

from workers import broker, connections, logs
from workers.settings import Settings, get_settings, is_sentinel


def _backend_url(url: str) -> str:
    """``url`` as Celery's Redis backend spells it: a Unix socket is ``socket:///path``."""
    for scheme in ("redis+socket://", "unix://"):
        if url.startswith(scheme):
            return "socket://" + url.removeprefix(scheme)
    return url


def _broker_url(url: str) -> str:
    """``url`` as kombu's Redis transport spells it: a Unix socket is ``redis+socket:///path``."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url


def soft_limit(hard: int) -> int:
    """The soft time limit for a hard one: 10 s earlier, or a little earlier for a short one."""
    return hard - 10 if hard > 20 else max(1, hard * 2 // 3)


def _backend(url: str) -> str:
    """The result backend setting for ``url``: fanout's retrying Redis or Sentinel backend, and the URL."""
    backend = "RetryingSentinelBackend" if is_sentinel(url) else "RetryingRedisBackend"
    return f"workers.backend:{backend}+{_backend_url(url)}"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration for ``settings``; every entry differs from Celery's default."""
    sentinel = connections.celery_options(settings)
    return {
        "broker_url": _broker_url(settings.broker_url),
        # Celery's Redis (or Sentinel) backend, with a chord part's report retried through a
        # Redis restart or a failover.
        "result_backend": _backend(settings.result_backend),
        # A queue of fanout's own (FANOUT_QUEUE), which its workers consume by default:
        # another Celery app on the same database keeps to its `celery` queue.
        "task_default_queue": settings.queue,
        # The user's task modules (FANOUT_IMPORTS), imported by every worker at start-up.
        "imports": settings.imports,
        # JSON only: a pickle message from the broker could run arbitrary code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Task events on, so Flower and `celery events` can see every task.
        "worker_send_task_events": True,
        # ...sent in bunches, every 0.1 s, not a Redis round trip per event (workers/consumer.py).
        "worker_consumer": "workers.consumer:Consumer",
        # Ack after the task ran, so a message held by a crashed worker is redelivered.
        "task_acks_late": True,
        # A pool process that dies mid-task (OOM killer, segfault, kill -9) puts its
        # message back instead of failing the whole chord with ChordError; the
        # attempt log (workers/attempts.py) fails a poison item after MAX_KILLS runs.
        "task_reject_on_worker_lost": True,
        # One message reserved per pool process: bounded memory, no hoarding, and a
        # reserved message never waits long enough to outlive the visibility timeout.  (Two
        # would hide a remote worker's fetch, two round trips a task, but while Redis is full
        # a worker then takes a message it cannot record and holds it in its main process,
        # whose loop stops meanwhile: docs/performance.md, "Workers on other machines".)
        "worker_prefetch_multiplier": 1,
        # Results (and the chord's fan-in) are kept this long, then Redis drops them.
        "result_expires": settings.result_expires,
        # A stuck task is killed rather than blocking its pool process forever
        # (its batch is requeued, see HeaderRequest, and the stuck item failed).
        "task_time_limit": settings.task_time_limit,
        # ...and warned shortly before, so a batch can report what it finished.
        "task_soft_time_limit": soft_limit(settings.task_time_limit),
        "broker_transport_options": {
            # A message whose worker vanished without a word (kill -9 of the main
            # process, power loss, network cut) goes back to the queue this long
            # after delivery; Celery's default is one hour.  Above the longest a
            # healthy worker holds a message, so nothing runs twice at once; see
            # Settings.visibility_timeout for the trade-off.
            "visibility_timeout": settings.visibility_timeout,
            # Every surviving worker sweeps for such messages this often (kombu's
            # default is 10 s x a throttle of 10, which alone would break the bound).
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": settings.connect_timeout,
            # For a sentinel:// URL: the master's name, and the Sentinels' password, TLS, timeouts.
            **sentinel["broker_transport_options"],
        },
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # For a sentinel:// URL: the master's name, and the Sentinels' password, TLS, timeouts.
            **sentinel["result_backend_transport_options"],
        },
        # A result or chord part written while Redis restarts (or is full) is retried, not
        # lost (about a minute of back-off at most; the message is redelivered after that).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": 2000,
        # Fail fast on a dead Redis instead of hanging in the connect call.
        "redis_socket_connect_timeout": settings.connect_timeout,
        "broker_connection_timeout": settings.connect_timeout,
        # TLS to a Sentinel-named master (FANOUT_SENTINEL_TLS): a sentinel:// URL has no place for it.
        **{key: sentinel[key] for key in ("broker_use_ssl", "redis_backend_use_ssl") if key in sentinel},
        # Workers keep retrying the broker at start-up (silences the 5.x warning).
        "broker_connection_retry_on_startup": True,
        # Publishing gives up after a few quick retries instead of retrying forever.
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    }


# kombu's Redis transports, except that a worker waits out a full Redis (maxmemory) instead
# of exiting and losing the message it had taken: registered under kombu's own scheme names.
broker.install()
app = Celery("fanout", include=["workers.callback", "workers.tasks", "workers.control"])
# Each worker keeps a registration in Redis, so clients find workers without a broadcast.
app.steps["consumer"].add("workers.registration:Registration")
# ...and heals the jobs whose batches Redis dropped (one worker at a time leads).
app.steps["consumer"].add("workers.healing:Healing")
# Read lazily, on first use of the configuration: importing the app never fails,
# and a bad setting surfaces where it can be reported (the CLI exits 2 with it).
app.add_defaults(lambda: celery_config(get_settings()))
# Worker logs name the job of every line about a batch, in FANOUT_LOG_FORMAT (human or JSON):
# applied to the handlers Celery sets up (root, task logger), so Celery's own lines follow it too.
after_setup_logger.connect(logs.configure, weak=False)
after_setup_task_logger.connect(logs.configure, weak=False)
task_postrun.connect(logs.end, weak=False)
