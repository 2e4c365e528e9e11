"""The mechanisms behind the speed-ups keep fanout's guarantees (speed itself is measured in bench/).

* Bulk publishing sends the messages Celery's own ``apply_async`` sends, and a
  chord published that way completes with every index exactly once, in order.
* Progress costs the same few O(1) Redis commands per refresh whatever the size of the job.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chord, group

from orchestrator.canvas import build_double
from orchestrator.local import LocalWorker
from orchestrator.publish import _argsrepr, bulk_supported, header_of, publish_chord
from orchestrator.run import submit, wait
from tests.conftest import TEST_REDIS_URL
from workers import tasks as _tasks  # noqa: F401 - the client knows the built-in tasks (and their limits)
from workers.app import celery_config
from workers.settings import Settings


def test_argsrepr_names_the_start_and_counts_the_items() -> None:
    assert _argsrepr((40, list(range(10_000)))) == "(40, <10000 items>)"
    assert _argsrepr((0, [["a.jpg", "b.jpg"]], 256)) == "(0, <1 items>, 256)"


def test_header_of_a_job_is_its_batches_and_the_collect_callback() -> None:
    job = build_double(list(range(10)), 3, job_id="job-1")
    header, body = header_of(job.signature)
    assert [tuple(sig.args) for sig in header] == [
        (0, [0, 1, 2]),
        (3, [3, 4, 5]),
        (6, [6, 7, 8]),
        (9, [9]),
    ]
    assert body.task == "fanout.collect" and body.options["task_id"] == "job-1"


def test_publish_rejects_a_chunk_below_one() -> None:
    job = build_double([1], 1)
    with pytest.raises(ValueError, match="chunk"):
        publish_chord(Celery(set_as_current=False), job.signature, chunk=0)


def test_bulk_path_covers_fanout_jobs_and_leaves_other_headers_to_celery() -> None:
    from workers.app import app

    header, _ = header_of(build_double(list(range(10)), 3).signature)
    assert bulk_supported(app, header)
    assert not bulk_supported(app, [])
    assert not bulk_supported(app, [header[0], header[1].clone().set(countdown=5)])
    assert not bulk_supported(app, [header[0], app.signature("fanout.double", args=(1,))])


# ----------------------------------------------------------------------------- system

system = pytest.mark.system


@pytest.fixture
def quiet_app(redis_client: redis.Redis) -> Iterator[tuple[Celery, redis.Redis]]:
    """A second app on a database no worker listens on, so published messages stay put."""
    base, db = TEST_REDIS_URL.rsplit("/", 1)
    url = f"{base}/{int(db) - 1}"
    probe = Celery("fanout-probe", set_as_current=False)
    probe.config_from_object(celery_config(Settings(broker_url=url, result_backend=url)))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield probe, client
    client.flushdb()
    client.close()
    probe.close()


def _queued(client: redis.Redis) -> list[dict[str, Any]]:
    """The messages waiting in the default queue, oldest first, bodies decoded."""
    messages = []
    for raw in reversed(client.lrange("fanout", 0, -1)):
        message = json.loads(raw)
        message["body"] = json.loads(base64.b64decode(message["body"]))
        messages.append(message)
    return messages


def _comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message without the fields that differ on every send (ids, tags, printable args)."""
    headers = {
        k: v
        for k, v in message["headers"].items()
        if k not in ("id", "root_id", "group", "origin", "argsrepr")
    }
    args, kwargs, embed = message["body"]
    callback = dict(embed["chord"])
    callback["options"] = {k: v for k, v in callback["options"].items() if k not in ("group_id", "reply_to")}
    properties = {
        k: v
        for k, v in message["properties"].items()
        if k not in ("correlation_id", "reply_to", "delivery_tag")
    }
    return {
        "headers": headers,
        "args": args,
        "kwargs": kwargs,
        "embed": {**embed, "chord": callback},
        "properties": properties,
        "content": (message["content-type"], message["content-encoding"]),
    }


@system
def test_bulk_messages_match_what_apply_async_sends(quiet_app: tuple[Celery, redis.Redis]) -> None:
    probe, client = quiet_app
    job = {"job_id": "job-x", "task": "double", "total": 3}

    def chord_sig() -> Any:
        header = [
            probe.signature("fanout.double_batch", args=(i, [i])).set(ignore_result=True) for i in range(3)
        ]
        body = probe.signature("fanout.collect", kwargs={"job": job}).set(task_id="job-x")
        return chord(group(header), body)

    # Given the same chord sent by Celery's apply_async and by the bulk publisher
    result = chord_sig().apply_async()
    for child in result.parent.results:
        probe.backend.result_consumer.cancel_for(child.id)
    celery_sent = _queued(client)
    client.delete("fanout")
    group_id = publish_chord(probe, chord_sig(), chunk=2)
    bulk_sent = _queued(client)

    # Then the workers get the same messages, in the same order, each naming the chord's group
    assert [_comparable(m) for m in bulk_sent] == [_comparable(m) for m in celery_sent]
    assert [m["headers"]["group_index"] for m in bulk_sent] == [0, 1, 2]
    assert {m["headers"]["group"] for m in bulk_sent} == {group_id}
    assert {m["body"][2]["chord"]["options"]["group_id"] for m in bulk_sent} == {group_id}
    assert len({m["headers"]["id"] for m in bulk_sent}) == 3
    # And the chord size is recorded before any header task can report
    assert int(client.get(probe.backend.get_key_for_group(group_id, ".s")) or 0) == 3


@system
def test_a_bulk_published_chord_reports_every_index_once_in_order(app: Celery, worker: LocalWorker) -> None:
    # Given 300 one-item tasks published 7 messages per round trip
    job = build_double(list(range(300)), 1)
    group_id = publish_chord(app, job.signature, chunk=7)
    # When the chord completes
    outcome = wait(app, job, group_id, timeout=90)
    # Then every item came back once, in input order
    assert outcome["results"] == [2 * i for i in range(300)]
    assert (outcome["succeeded"], outcome["failed"], outcome["errors"]) == (300, 0, [])


@contextlib.contextmanager
def commands_sent() -> Iterator[list[tuple[str, ...]]]:
    """Every command this thread sends to any Redis meanwhile, through any client, pipelines included.

    redis-py packs each command it sends, alone or in a pipeline, with its
    serializer's ``pack``; each is recorded as (name, first argument).
    """
    from redis.connection import HiredisRespSerializer, PythonRespSerializer

    sent: list[tuple[str, ...]] = []
    me = threading.get_ident()
    with pytest.MonkeyPatch.context() as patch:
        for serializer in (PythonRespSerializer, HiredisRespSerializer):
            pack = serializer.pack

            def recording(self: Any, *args: Any, _pack: Callable[..., Any] = pack) -> Any:
                if threading.get_ident() == me:
                    sent.append(tuple(_text(a) for a in args[:2]))
                return _pack(self, *args)

            patch.setattr(serializer, "pack", recording)
        yield sent


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@system
def test_progress_costs_the_same_two_commands_per_poll_whatever_the_size(
    app: Celery, worker: LocalWorker
) -> None:
    def poll_commands(n: int) -> tuple[list[tuple[str, ...]], list[int], str, str]:
        job = build_double(list(range(n)), 1)  # one task per item: a per-item loop is a per-batch loop
        group_id = submit(app, job, 600)
        refreshes: list[int] = []
        with commands_sent() as sent:
            outcome = wait(app, job, group_id, timeout=90, progress=lambda done, _all: refreshes.append(done))
        assert outcome["failed"] == 0 and len(outcome["results"]) == n
        state_key = _text(app.backend.get_key_for_task(job.job_id))
        join_key = _text(app.backend.get_key_for_group(group_id, ".j"))
        return sent, refreshes, state_key, join_key

    per_poll = {}
    for n in (10, 600):
        sent, refreshes, state_key, join_key = poll_commands(n)
        # Each poll: one GET of the callback's state, one ZCARD of the chord's join, nothing
        # else; the last poll's GET finds the outcome.  Exactly that, however many items.
        polls = (len(sent) + 1) // 2
        assert sent == [("GET", state_key), ("ZCARD", join_key)] * (polls - 1) + [("GET", state_key)], (
            n,
            sent[:6],
        )
        per_poll[n] = (len(sent) - 1) / (polls - 1) if polls > 1 else 2.0
        assert refreshes == sorted(refreshes) and refreshes[-1] == n
        if n == 600:
            assert polls > 2, "the large job should take several polls"
            assert any(0 < done < n for done in refreshes), "progress should be seen mid-run"
    # The same cost per poll for 10 and 600 items.
    assert per_poll[10] == per_poll[600] == 2


@system
def test_a_header_the_bulk_path_does_not_cover_goes_through_apply_async(
    app: Celery, worker: LocalWorker
) -> None:
    job = build_double(list(range(20)), 4)
    for sig in job.signature.tasks:
        sig.set(expires=600)  # an option only Celery's own path sends
    outcome = wait(app, job, publish_chord(app, job.signature), timeout=60)
    assert outcome["results"] == [2 * i for i in range(20)] and outcome["failed"] == 0
