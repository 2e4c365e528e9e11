"""The shape of the chord, built without a broker."""

from __future__ import annotations

from typing import Any

import pytest
from celery import chord

from orchestrator.canvas import auto_batch_size, build, build_double, build_resize


def test_building_a_job_sends_nothing_to_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building is pure: not one Redis command, so no message published and no result subscribed to.

    That sending subscribes the client to no header result is shown on a real send, by
    Redis's own count of subscribers: tests/test_speed_mechanisms.py::
    test_submit_subscribes_the_client_to_no_header_result.
    """
    from redis.connection import AbstractConnection

    sent: list[Any] = []

    def send_packed_command(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sent.append(command)  # every command of redis-py, and of kombu's Redis transport, passes here
        raise ConnectionError("building a job must not talk to Redis")

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send_packed_command)
    job = build_double(list(range(100)), batch_size=10)
    assert job.batches == 10
    assert sent == []


def test_double_job_is_a_chord_of_batches_with_collect_as_callback() -> None:
    job = build_double(list(range(10)), batch_size=4, job_id="job-1")
    sig = job.signature
    assert isinstance(sig, chord)
    header = list(sig.tasks)
    assert [t.task for t in header] == ["fanout.double_batch"] * 3
    assert [tuple(t.args) for t in header] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])]
    assert all(t.immutable and t.options.get("ignore_result") for t in header)
    assert sig.body.task == "fanout.collect"
    assert sig.body.kwargs["job"] == {"job_id": "job-1", "task": "double", "total": 10}
    assert job.requires == ("fanout.double_batch",)
    assert sig.body.options["task_id"] == "job-1"
    assert (job.total, job.batches, job.batch_size) == (10, 3, 4)
    assert job.record("g")["group_id"] == "g"


def test_resize_job_carries_paths_not_pixels() -> None:
    pairs = [(f"/in/{i}.jpg", f"/out/{i}.jpg") for i in range(5)]
    job = build_resize(pairs, 256, "/out", batch_size=2, job_id="job-2")
    header = list(job.signature.tasks)
    assert [t.task for t in header] == ["fanout.resize_items"] * 3
    start, items, kwargs = header[2].args
    assert (start, items, kwargs["out_dir"]) == (4, [["/in/4.jpg", "/out/4.jpg", 256, 256]], "/out")
    options = kwargs["options"]
    assert options["mode"] == "fit" and options["format"] == "keep" and options["upscale"] is False
    # The manifest and contact sheet are resize's reduce step, run by the callback.
    job_doc = job.signature.body.kwargs["job"]
    assert job_doc["reduce"] == "fanout.resize_report"
    assert job_doc["reduce_kwargs"] == {"out_dir": "/out", "job_id": "job-2", "per_image": 1, "sheet": True}
    assert set(job.requires) == {"fanout.resize_items", "fanout.resize_report"}


def test_batch_size_one_is_one_task_per_item() -> None:
    assert build_double([5, 6, 7], batch_size=1).batches == 3


@pytest.mark.parametrize(
    ("total", "processes", "cap", "expected"),
    [(0, 2, 100, 1), (3, 2, 100, 1), (100, 2, 100, 13), (10**6, 2, 10_000, 10_000), (10, 0, 5, 3)],
)
def test_auto_batch_size(total: int, processes: int, cap: int, expected: int) -> None:
    assert auto_batch_size(total, processes, cap) == expected


def test_bad_batch_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        build_double([1], batch_size=0)
    with pytest.raises(ValueError):
        build_resize([("a", "b")], 0, "/out", batch_size=1)


def test_any_task_builds_the_same_chord_with_its_kwargs_and_reduce() -> None:
    job = build(
        "myjobs.score",
        [{"a": 1}, {"a": 2}, {"a": 3}],
        2,
        kwargs={"scale": 2},
        reduce="myjobs.summarize",
        reduce_kwargs={"top": 3},
        reduce_limits=(120, 110),
        job_id="job-3",
        output="jsonl",
    )
    header = list(job.signature.tasks)
    assert [t.task for t in header] == ["myjobs.score"] * 2
    assert [tuple(t.args) for t in header] == [
        (0, [{"a": 1}, {"a": 2}], {"scale": 2}),
        (2, [{"a": 3}], {"scale": 2}),
    ]
    body = job.signature.body
    assert body.task == "fanout.collect" and body.options["task_id"] == "job-3"
    assert body.kwargs["job"] == {
        "job_id": "job-3",
        "task": "myjobs.score",
        "total": 3,
        "reduce": "myjobs.summarize",
        "reduce_kwargs": {"top": 3},
    }
    assert (body.options["time_limit"], body.options["soft_time_limit"]) == (120, 110)
    assert job.requires == ("myjobs.score", "myjobs.summarize")
    assert job.record("g")["output"] == "jsonl"
