"""The one Celery app.  ``celery -A workers worker`` and ``celery -A workers flower`` find it here."""

from __future__ import annotations

from typing import Any

from celery import Celery

from workers.settings import Settings, get_settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration for ``settings``; every entry differs from Celery's default."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only: a pickle message from the broker could run arbitrary code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Task events on, so Flower and `celery events` can see every task.
        "worker_send_task_events": True,
        # Ack after the task ran, so a message held by a crashed worker is redelivered.
        "task_acks_late": True,
        # One message reserved per pool process: bounded memory, no hoarding, and a
        # reserved message never waits long enough to outlive the visibility timeout.
        "worker_prefetch_multiplier": 1,
        # Results (and the chord's fan-in) are kept this long, then Redis drops them.
        "result_expires": settings.result_expires,
        # A stuck task is killed rather than blocking its pool process forever.
        "task_time_limit": settings.task_time_limit,
        # ...and warned shortly before, so a batch can report what it finished.
        "task_soft_time_limit": max(1, settings.task_time_limit - 10),
        # An unacked message goes back to the queue after this long (default 1 h):
        # kept above the hard time limit so a running task is never handed out twice.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": settings.connect_timeout,
        },
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
        },
        # Fail fast on a dead Redis instead of hanging in the connect call.
        "redis_socket_connect_timeout": settings.connect_timeout,
        "broker_connection_timeout": settings.connect_timeout,
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


app = Celery("fanout", include=["workers.tasks"])
# Read lazily, on first use of the configuration: importing the app never fails,
# and a bad setting surfaces where it can be reported (the CLI exits 2 with it).
app.add_defaults(lambda: celery_config(get_settings()))
