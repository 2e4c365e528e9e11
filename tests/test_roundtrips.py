"""A batch's own Redis commands take two round trips: one as it starts, one with its chord report.

Counted through bench.delayproxy's proxy, which reads the client's side as RESP and
counts its round trips (a request sent after a reply).  The fold of the batch's last
writes into Celery's chord report uses a private part of Celery 5.7's Redis backend;
with it switched off (``FOLDS``, as for another Celery) the same writes land in
three round trips, in the order the guarantees need.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
import redis
from celery import Celery
from celery.app.task import Context

from bench.delayproxy import DelayProxy
from workers import backend as backend_module
from workers import keys
from workers.attempts import RedisAttemptLog
from workers.backend import RetryingRedisBackend
from workers.batchio import BatchEnd, batch_end, start_batch
from workers.control import JobControl

pytestmark = pytest.mark.system


@pytest.fixture
def proxy(redis_client: redis.Redis) -> Iterator[DelayProxy]:
    """A counting proxy (no delay) in front of the test Redis."""
    target = redis_client.connection_pool.connection_kwargs
    with DelayProxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379)))) as counting:
        yield counting


@pytest.fixture
def through(proxy: DelayProxy, redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """A client of the test database through the proxy, connected (its handshake not counted)."""
    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=db)
    client.ping()
    proxy.take()
    yield client
    client.close()


@pytest.fixture
def proxied_backend(app: Celery, proxy: DelayProxy, redis_client: redis.Redis) -> Iterator[Any]:
    """fanout's result backend, talking to the test database through the proxy."""
    url = urlsplit(app.conf.result_backend.split("+", 1)[1])
    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    auth = url.netloc.rpartition("@")[0]
    backend = RetryingRedisBackend(
        app=app, url=f"redis://{auth + '@' if auth else ''}127.0.0.1:{proxy.port}/{db}"
    )
    backend.client.ping()
    proxy.take()
    yield backend
    backend.client.close()


def test_a_batch_start_counts_its_run_and_reads_its_jobs_stop_and_budget_in_one_round_trip(
    through: redis.Redis, proxy: DelayProxy, redis_client: redis.Redis
) -> None:
    group, task_id = f"g-{uuid4().hex}", f"t-{uuid4().hex}"
    redis_client.set(keys.stop(group), "cancelled")
    redis_client.set(keys.budget(group), "5/100")

    first = start_batch(through, task_id, group, 60)
    assert proxy.take().round_trips == 1
    again = start_batch(through, task_id, group, 60)

    assert (first.runs, again.runs) == (1, 2)
    assert (first.stop, first.budget) == (b"cancelled", b"5/100")
    assert 0 < redis_client.ttl(keys.batch_runs(task_id)) <= 60
    control = JobControl(through, group, 60, first.stop, first.budget)
    assert (control.reason, control.budget) == ("cancelled", (5, 100))


def test_a_batch_outside_a_job_group_reads_no_stop_reason(through: redis.Redis) -> None:
    started = start_batch(through, f"t-{uuid4().hex}", None, 60)
    assert (started.runs, started.stop, started.budget) == (1, None, None)


def _finished_batch(redis_client: redis.Redis, failed: int) -> Context:
    """The request of header batch 3 of a new job (a budget of 2 failures in 10 items),
    with its last writes queued as workers/core.py queues them."""
    group, task_id = f"g-{uuid4().hex}", f"t-{uuid4().hex}"
    redis_client.set(keys.batch_runs(task_id), 1)
    request = Context(id=task_id, group=group, group_index=3, chord=None)
    end = batch_end(request)
    end.add("dropping the batch's run counts", RedisAttemptLog(redis_client, task_id, 60).drop_counts)
    JobControl(redis_client, group, 60, None, b"2/10").count_failures(end, failed)
    return request


def _parts(redis_client: redis.Redis, backend: Any, group: str) -> int:
    """The parts the chord of ``group`` has counted (its join key: a sorted set, or a list)."""
    jkey = backend.get_key_for_group(group, ".j")
    return int(redis_client.zcard(jkey) if redis_client.type(jkey) == b"zset" else redis_client.llen(jkey))


def _assert_reported(redis_client: redis.Redis, backend: Any, request: Context) -> None:
    group = request.group
    assert _parts(redis_client, backend, group) == 1  # the chord counted the part
    assert redis_client.getbit(keys.done(group), 3) == 1  # ...and the healer sees it done
    assert not redis_client.exists(keys.batch_runs(request.id))
    assert int(redis_client.get(keys.failures(group)) or 0) == 3
    reason = redis_client.get(keys.stop(group))
    assert reason == b"failure budget exceeded: 3 of 10 items failed (at most 2 allowed)"


def test_the_batch_end_rides_the_chord_report_in_one_round_trip(
    proxied_backend: Any, proxy: DelayProxy, redis_client: redis.Redis
) -> None:
    assert backend_module.FOLDS  # the Celery pyproject.toml pins
    request = _finished_batch(redis_client, failed=3)

    proxied_backend.on_chord_part_return(request, "SUCCESS", {"start": 0, "results": []})

    assert proxy.take().round_trips == 1
    _assert_reported(redis_client, proxied_backend, request)
    assert batch_end(request).sent


def test_without_the_fold_the_same_writes_land_in_three_round_trips(
    proxied_backend: Any, proxy: DelayProxy, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_module, "FOLDS", False)  # as with a Celery of another shape
    request = _finished_batch(redis_client, failed=3)

    proxied_backend.on_chord_part_return(request, "SUCCESS", {"start": 0, "results": []})

    assert proxy.take().round_trips == 3  # the writes, Celery's own report, the done bit
    _assert_reported(redis_client, proxied_backend, request)


def test_a_report_retried_after_the_fold_ran_does_not_count_the_failures_twice(
    proxied_backend: Any, redis_client: redis.Redis
) -> None:
    request = _finished_batch(redis_client, failed=3)
    proxied_backend.on_chord_part_return(request, "SUCCESS", {"start": 0, "results": []})
    proxied_backend.on_chord_part_return(request, "SUCCESS", {"start": 0, "results": []})  # a retry

    assert int(redis_client.get(keys.failures(request.group)) or 0) == 3
    assert _parts(redis_client, proxied_backend, request.group) == 1


def test_a_batch_end_with_no_chord_report_sends_itself_in_one_round_trip(
    through: redis.Redis, proxy: DelayProxy, redis_client: redis.Redis
) -> None:
    task_id, metric = f"t-{uuid4().hex}", f"fanout:test-metric:{uuid4().hex}"
    redis_client.set(keys.batch_runs(task_id), 1)
    end = BatchEnd()
    end.add("dropping the batch's run counts", RedisAttemptLog(through, task_id, 60).drop_counts)
    replies: list[Any] = []
    end.add("a metric", lambda pipe: pipe.hincrby(metric, "batches", 1), replies.extend)

    end.send(through)
    end.send(through)  # once only

    assert proxy.take().round_trips == 1
    assert not redis_client.exists(keys.batch_runs(task_id))
    assert replies == [1] and redis_client.hget(metric, "batches") == b"1"


@pytest.fixture
def consumer_channel(proxy: DelayProxy, redis_client: redis.Redis) -> Iterator[Any]:
    """A channel of fanout's broker transport on a queue of its own, through the counting proxy."""
    from kombu.connection import Connection

    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    with Connection(f"redis://127.0.0.1:{proxy.port}/{db}") as connection:  # type: ignore[no-untyped-call]
        channel = connection.default_channel
        queue = f"fanout-test-acks-{uuid4().hex}"
        channel.queue_declare(queue)
        for n in range(3):
            channel.basic_publish(channel.prepare_message(f"m{n}"), "", queue)
        channel.queue_name = queue
        yield channel
    redis_client.delete(queue)


def test_an_ack_costs_no_round_trip_of_its_own_and_goes_with_the_next_write(
    consumer_channel: Any, proxy: DelayProxy, redis_client: redis.Redis
) -> None:
    from workers.broker import QoS

    qos = consumer_channel.qos
    assert isinstance(qos, QoS)
    first = consumer_channel.basic_get(consumer_channel.queue_name, no_ack=False)
    assert redis_client.hexists(qos.unacked_key, first.delivery_tag)  # reserved

    proxy.take()
    first.ack()
    assert proxy.take().round_trips == 0
    assert redis_client.hexists(qos.unacked_key, first.delivery_tag)  # not sent yet
    assert qos.can_consume()  # type: ignore[no-untyped-call]  # ...but no longer held against the prefetch

    second = consumer_channel.basic_get(consumer_channel.queue_name, no_ack=False)  # a fetch, then its record
    assert proxy.take().round_trips == 2
    assert not redis_client.hexists(qos.unacked_key, first.delivery_tag)  # went with the record
    assert not redis_client.zscore(qos.unacked_index_key, first.delivery_tag)
    assert redis_client.hexists(qos.unacked_key, second.delivery_tag)

    second.ack()
    qos.send_acks()  # what the event loop does every ACKS_EVERY_S
    assert not redis_client.hexists(qos.unacked_key, second.delivery_tag)


def test_pending_acks_are_sent_before_the_channel_closes(
    consumer_channel: Any, redis_client: redis.Redis
) -> None:
    qos = consumer_channel.qos
    message = consumer_channel.basic_get(consumer_channel.queue_name, no_ack=False)
    message.ack()
    unacked_key = qos.unacked_key

    consumer_channel.close()

    assert not redis_client.hexists(unacked_key, message.delivery_tag)
    assert redis_client.llen(consumer_channel.queue_name) == 2  # the two never taken, not restored twice
