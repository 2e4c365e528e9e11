"""``fanout exporter``: Prometheus metrics of jobs, items, queues and workers, at ``/metrics``.

A scrape is two round trips to Redis whatever the number of jobs, items or
workers: the counters the workers keep (one hash, workers/metrics.py), the job
index's counts (workers/jobindex.py), the queue's lengths and the workers'
registrations (workers/registration.py).  Nothing is scanned and nothing is
broadcast, so scraping costs the workers nothing.

Names follow Prometheus's conventions, and celery-exporter's where they mean
the same (``queue_length``, ``active_worker_count``, ``active_process_count``,
a ``name`` label for the task, ``exception`` for a failure's class); they count
items, where Celery's exporters count batches.  The list, and which backlog an
autoscaler should use: docs/observability.md.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from workers import connections, jobindex, keys, metrics
from workers.settings import Settings

logger = logging.getLogger(__name__)

#: kombu's Redis transport: where a message without a priority waits, and the lists of
#: its other priority steps (``QUEUE\\x06\\x16N``, kombu.transport.redis ``_q_for_pri``).
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (3, 6, 9)
#: kombu's sorted set of the messages delivered to a consumer and not acked yet.
UNACKED_INDEX = "unacked_index"

#: Every metric family the exporter serves (the dashboard test checks its queries against these).
FAMILIES = {
    "fanout_up": "gauge",
    "fanout_scrape_duration_seconds": "gauge",
    "fanout_items_succeeded_total": "counter",
    "fanout_items_failed_total": "counter",
    "fanout_items_cancelled_total": "counter",
    "fanout_batch_duration_seconds": "histogram",
    "fanout_jobs": "gauge",
    "fanout_queue_length": "gauge",
    "fanout_queue_reserved": "gauge",
    "fanout_queue_backlog": "gauge",
    "fanout_queue_active": "gauge",
    "fanout_broker_unacked_messages": "gauge",
    "fanout_active_worker_count": "gauge",
    "fanout_active_process_count": "gauge",
}


@dataclass
class Snapshot:
    """What one scrape read from Redis."""

    counters: dict[str, float] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)


def read(client: Any, settings: Settings, now: float) -> Snapshot:
    """Everything a scrape shows: two round trips (three if a worker consumes another queue)."""
    ended = [keys.jobs_ended(state) for state in jobindex.ENDED]
    with client.pipeline(transaction=False) as pipe:
        jobindex.prune(pipe, now, settings.result_expires)
        pruned = len(pipe)
        pipe.hgetall(keys.METRICS)
        pipe.zcard(keys.JOBS)
        for key in ended:
            pipe.zcard(key)
        pipe.zcard(UNACKED_INDEX)
        pipe.smembers(keys.WORKERS)
        for name in _priority_lists(settings.queue):
            pipe.llen(name)
        raw_counters, total, *rest = pipe.execute()[pruned:]
    counts, (unacked, names), lengths = (
        rest[: len(ended)],
        rest[len(ended) : len(ended) + 2],
        rest[len(ended) + 2 :],
    )
    snap = Snapshot(unacked=int(unacked), lengths={settings.queue: sum(int(n) for n in lengths)})
    snap.counters = {_text(k): float(v) for k, v in raw_counters.items()}
    snap.jobs = dict(zip(jobindex.ENDED, map(int, counts), strict=True))
    snap.jobs[jobindex.RUNNING] = max(0, int(total) - sum(snap.jobs.values()))
    hostnames = sorted(_text(n) for n in names)
    if hostnames:
        snap.workers = [json.loads(raw) for raw in client.mget([keys.worker(h) for h in hostnames]) if raw]
    others = sorted({q for w in snap.workers for q in w.get("queues") or ()} - {settings.queue})
    if others:
        with client.pipeline(transaction=False) as pipe:
            for queue in others:
                for name in _priority_lists(queue):
                    pipe.llen(name)
            replies = pipe.execute()
        per = 1 + len(PRIORITY_STEPS)
        for i, queue in enumerate(others):
            snap.lengths[queue] = sum(int(n) for n in replies[i * per : (i + 1) * per])
    return snap


def _priority_lists(queue: str) -> list[str]:
    return [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def families(snap: Snapshot, queue: str, scrape_s: float) -> Iterator[Metric]:
    """The metric families of ``snap`` (``queue``: FANOUT_QUEUE, shown even with no worker on it)."""
    up = GaugeMetricFamily("fanout_up", "Whether the last scrape read Redis (1) or not (0).")
    up.add_metric([], 1)
    yield up
    took = GaugeMetricFamily("fanout_scrape_duration_seconds", "How long the last scrape took to read Redis.")
    took.add_metric([], scrape_s)
    yield took
    yield from _items(snap.counters)
    yield _histogram(snap.counters)
    jobs = GaugeMetricFamily(
        "fanout_jobs", "Jobs kept in Redis (sent within FANOUT_RESULT_EXPIRES), by state.", labels=["state"]
    )
    for state in jobindex.STATES:
        jobs.add_metric([state], snap.jobs.get(state, 0))
    yield jobs
    yield from _queues(snap, queue)


def _items(counters: dict[str, float]) -> Iterator[Metric]:
    succeeded = CounterMetricFamily(
        "fanout_items_succeeded", "Items that ran and returned a result, by task.", labels=["name"]
    )
    failed = CounterMetricFamily(
        "fanout_items_failed",
        "Items that failed, by task and the class of the exception they raised.",
        labels=["name", "exception"],
    )
    cancelled = CounterMetricFamily(
        "fanout_items_cancelled",
        "Items not run because their job was stopped (cancelled, or over its failure budget), by task.",
        labels=["name"],
    )
    for key, value in sorted(counters.items()):
        kind, *rest = key.split(metrics.SEP)
        if kind == "items" and len(rest) == 2 and rest[0] == "succeeded":
            succeeded.add_metric([rest[1]], value)
        elif kind == "items" and len(rest) == 2 and rest[0] == "cancelled":
            cancelled.add_metric([rest[1]], value)
        elif kind == "failures" and len(rest) == 2:
            failed.add_metric(rest, value)
    yield from (succeeded, failed, cancelled)


def _histogram(counters: dict[str, float]) -> Metric:
    histogram = HistogramMetricFamily(
        "fanout_batch_duration_seconds",
        "How long a batch took on a worker, from its start to its end, by task.",
        labels=["name"],
    )
    buckets: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for key, value in counters.items():
        kind, *rest = key.split(metrics.SEP)
        if kind == "batch" and len(rest) == 2:
            buckets.setdefault(rest[0], {})[rest[1]] = value
        elif kind == "batch_sum" and len(rest) == 1:
            sums[rest[0]] = value
    for task in sorted(buckets):
        running = 0.0
        cumulative = []
        for bound in metrics.BOUNDS:
            running += buckets[task].get(bound, 0.0)
            cumulative.append((bound, running))
        histogram.add_metric([task], cumulative, sums.get(task, 0.0))
    return histogram


def _queues(snap: Snapshot, default_queue: str) -> Iterator[Metric]:
    queues = sorted({default_queue, *snap.lengths, *(q for w in snap.workers for q in w.get("queues") or ())})
    reserved = dict.fromkeys(queues, 0)
    active = dict.fromkeys(queues, 0)
    workers = dict.fromkeys(queues, 0)
    processes = dict.fromkeys(queues, 0)
    for record in snap.workers:
        for queue in record.get("queues") or ():
            workers[queue] += 1
            processes[queue] += int(record.get("concurrency") or 0)
        for queue, n in (record.get("reserved") or {}).items():
            if queue in reserved:
                reserved[queue] += int(n)
        for queue, n in (record.get("active") or {}).items():
            if queue in active:
                active[queue] += int(n)
    label = ["queue_name"]
    gauges = {
        "fanout_queue_length": (
            "Messages (batches) waiting in the queue: its Redis list's length.",
            snap.lengths,
        ),
        "fanout_queue_reserved": (
            "Batches workers have taken from the queue into their prefetch but not started.",
            reserved,
        ),
        "fanout_queue_backlog": (
            "Batches not started: waiting in the queue plus reserved in workers' prefetch (scale on this).",
            {q: snap.lengths.get(q, 0) + reserved[q] for q in queues},
        ),
        "fanout_queue_active": ("Batches running now on the workers consuming the queue.", active),
        "fanout_active_worker_count": ("Workers consuming the queue (registered in the last 6 s).", workers),
        "fanout_active_process_count": ("Pool processes of the workers consuming the queue.", processes),
    }
    for name, (doc, values) in gauges.items():
        family = GaugeMetricFamily(name, doc, labels=label)
        for queue in queues:
            family.add_metric([queue], values.get(queue, 0))
        yield family
    unacked = GaugeMetricFamily(
        "fanout_broker_unacked_messages",
        "Messages delivered to workers and not acked yet, all queues (kombu's unacked_index): "
        "reserved plus running, under late acks.",
    )
    unacked.add_metric([], snap.unacked)
    yield unacked


class Collector:
    """A prometheus_client collector that reads Redis at each scrape."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        began = time.perf_counter()
        try:
            snap = read(connections.backend(self.app), self.settings, time.time())
        except Exception as exc:  # noqa: BLE001 - a scrape says Redis is down rather than failing
            logger.warning("scrape failed: %s", exc)
            up = GaugeMetricFamily("fanout_up", "Whether the last scrape read Redis (1) or not (0).")
            up.add_metric([], 0)
            yield up
            return
        yield from families(snap, self.settings.queue, time.perf_counter() - began)


def registry(app: Celery, settings: Settings) -> CollectorRegistry:
    """A registry with fanout's collector alone (no process metrics: they would be the exporter's)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(Collector(app, settings))
    return found


def serve(app: Celery, settings: Settings, port: int, address: str) -> None:
    """Serve ``/metrics`` on ``address:port`` until SIGTERM or Ctrl-C."""
    server, thread = start_http_server(port, addr=address, registry=registry(app, settings))
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`: shut down as Ctrl-C does
    try:
        while thread.is_alive():
            thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
