"""A job before it is sent: its spec and plan (orchestrator/plan.py) and the shape of its chord
(orchestrator/canvas.py), built without a broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import chord

from orchestrator import builtin
from orchestrator.canvas import build
from orchestrator.plan import JobSpec, auto_batch_size, prepare
from workers.errors import InputError


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
    plan = builtin.double(list(range(100)))
    assert len(build(plan, 10).tasks) == plan.batches(10) == 10
    assert sent == []


def test_double_job_is_a_chord_of_batches_with_collect_as_callback() -> None:
    plan = builtin.double(list(range(10)), job_id="job-1")
    sig = build(plan, 4)
    assert isinstance(sig, chord)
    header = list(sig.tasks)
    assert [t.task for t in header] == ["fanout.double_batch"] * 3
    assert [tuple(t.args) for t in header] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])]
    assert all(t.immutable and t.options.get("ignore_result") for t in header)
    assert sig.body.task == "fanout.collect"
    assert sig.body.kwargs["job"] == {"job_id": "job-1", "task": "double", "total": 10}
    assert plan.spec.requires == ("fanout.double_batch",)
    assert sig.body.options["task_id"] == "job-1"
    assert (plan.total, plan.batches(4)) == (10, 3)


def test_resize_job_carries_paths_not_pixels() -> None:
    pairs = [(f"/in/{i}.jpg", f"/out/{i}.jpg") for i in range(5)]
    plan = builtin.resize(pairs, 256, "/out", job_id="job-2")
    sig = build(plan, 2)
    header = list(sig.tasks)
    assert [t.task for t in header] == ["fanout.resize_items"] * 3
    start, items, kwargs = header[2].args
    # Paths and sizes only; the last size, the contact sheet's tile, carries the image's index.
    assert (start, items, kwargs["out_dir"]) == (4, [["/in/4.jpg", "/out/4.jpg", 256, 256, 4]], "/out")
    options = kwargs["options"]
    assert options["mode"] == "fit" and options["format"] == "keep" and options["upscale"] is False
    # The manifest and contact sheet are resize's reduce step, run by the callback.
    job_doc = sig.body.kwargs["job"]
    assert job_doc["reduce"] == "fanout.resize_report"
    assert job_doc["reduce_kwargs"] == {
        "out_dir": "/out",
        "job_id": "job-2",
        "per_image": 1,
        "sheet": True,
        "tiles": "/out/.fanout-tiles/job-2",  # the batches' strips, drawn into pages as the job runs
    }
    assert set(plan.spec.requires) == {"fanout.resize_items", "fanout.resize_report"}


def test_batch_size_one_is_one_task_per_item() -> None:
    assert len(build(builtin.double([5, 6, 7]), 1).tasks) == 3


@pytest.mark.parametrize(
    ("total", "processes", "cap", "expected"),
    [(0, 2, 100, 1), (3, 2, 100, 1), (100, 2, 100, 13), (10**6, 2, 10_000, 10_000), (10, 0, 5, 3)],
)
def test_auto_batch_size(total: int, processes: int, cap: int, expected: int) -> None:
    assert auto_batch_size(total, processes, cap) == expected


def test_bad_sizes_are_input_errors() -> None:
    with pytest.raises(InputError, match="batch_size"):
        build(builtin.double([1]), 0)
    with pytest.raises(InputError, match="max_side"):
        builtin.resize([("a", "b")], 0, "/out")
    with pytest.raises(InputError, match="per_image"):
        builtin.resize_items([("a", "b", 1, 1)] * 3, {}, "/out", 2)


def test_any_task_builds_the_same_chord_with_its_kwargs_and_reduce() -> None:
    spec = JobSpec(
        "myjobs.score",
        kwargs={"scale": 2},
        reduce="myjobs.summarize",
        reduce_kwargs={"top": 3},
        reduce_limits=(120, 110),
    )
    sig = build(prepare(spec, [{"a": 1}, {"a": 2}, {"a": 3}], job_id="job-3"), 2)
    header = list(sig.tasks)
    assert [t.task for t in header] == ["myjobs.score"] * 2
    assert [tuple(t.args) for t in header] == [
        (0, [{"a": 1}, {"a": 2}], {"scale": 2}),
        (2, [{"a": 3}], {"scale": 2}),
    ]
    body = sig.body
    assert body.task == "fanout.collect" and body.options["task_id"] == "job-3"
    assert body.kwargs["job"] == {
        "job_id": "job-3",
        "task": "myjobs.score",
        "total": 3,
        "reduce": "myjobs.summarize",
        "reduce_kwargs": {"top": 3},
    }
    assert (body.options["time_limit"], body.options["soft_time_limit"]) == (120, 110)
    assert spec.requires == ("myjobs.score", "myjobs.summarize")


# --- the spec and the plan ----------------------------------------------------------------------


def test_a_spec_survives_its_record_as_it_was() -> None:
    spec = JobSpec(
        "myjobs.score",
        shown_as="score",
        kwargs={"scale": 2},
        reduce="myjobs.summarize",
        reduce_kwargs={"top": 3},
        reduce_limits=(120, 110),
        batch_cap=50,
        results_root="/r",
        where="/r/j",
        root="/r",
        range=(5, 500),
        retry_of="j0",
        inputs_of="j0",
    )
    assert JobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert JobSpec("t").shown_as == "t"


def test_a_record_that_is_not_a_spec_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a job spec"):
        JobSpec.from_json({"task": "t", "colour": "blue"})


def test_prepare_refuses_what_json_cannot_carry_and_sends_a_range_by_its_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(InputError, match="item 1 is not JSON"):
        prepare(JobSpec("t"), [1, object()])
    with pytest.raises(InputError, match="no items"):
        prepare(JobSpec("t"), [])
    with pytest.raises(InputError, match="kwargs must be a dict of JSON values"):
        prepare(JobSpec("t", kwargs={"f": object()}), [1])
    plan = prepare(JobSpec("t", results_root="/r"), range(10, 20), by_reference=True, job_id="j")
    assert (plan.spec.where, plan.spec.root, plan.spec.range) == ("/r/j", "/r", (10, 20))
    assert build(plan, 5).tasks[1].args[1] == {"range": [15, 20]}


def test_a_retry_plan_names_the_job_it_retries_and_the_one_that_holds_the_inputs() -> None:
    first = prepare(JobSpec("t"), [1, 2, 3], job_id="j1").spec
    again = prepare(first, [2], retry_of="j1", indexes=[1], job_id="j2")
    assert (again.spec.retry_of, again.spec.inputs_of, again.indexes) == ("j1", "j1", (1,))
    # A retry of the retry: its inputs are still the first job's
    third = prepare(again.spec, [2], retry_of="j2", indexes=[0], job_id="j3")
    assert (third.spec.retry_of, third.spec.inputs_of) == ("j2", "j1")
    job = build(third, 1).body.kwargs["job"]
    assert (job["retry_of"], job["indexes"]) == ("j2", [0])
    # A plan that is not a retry carries neither
    assert prepare(third.spec, [1]).spec.retry_of is None
