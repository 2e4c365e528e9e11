"""Faults on the real tasks, not rigged ones: a worker killed mid-resize, and the soft time limit.

``tests/test_faults.py`` proves each guarantee with a rigged task; these run
``fanout.resize_items`` itself, so its own code path (the header wrapper, its
retries, the report as its reduce) is what is killed and interrupted.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from celery import Celery

from orchestrator.canvas import build_resize
from orchestrator.local import LocalWorker
from orchestrator.run import submit, wait
from orchestrator.samples import make_photo
from tests.faultkit import QUICK, kill_all, new_queue, worker

pytestmark = pytest.mark.system


def on_queue(plan: object, queue: str) -> None:
    """Route a built job's header and callback to ``queue`` (the fault workers consume only it)."""
    signature = plan.signature  # type: ignore[attr-defined]
    for header in signature.tasks:
        header.set(queue=queue)
    signature.body.set(queue=queue)


def running(app: Celery, local: LocalWorker) -> set[str]:
    """The ids of the tasks ``local`` runs now."""
    replies = app.control.inspect([local.hostname], timeout=1).active() or {}
    return {task["id"] for task in replies.get(local.hostname, [])}


def test_kill_9_of_a_worker_mid_resize_loses_no_image(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    queue = new_queue()
    doomed = worker(app, queue, tmp_path, "doomed-resize", env=QUICK)
    workers_started.append(doomed)
    survivor = worker(app, queue, tmp_path, "survivor-resize", env=QUICK)
    workers_started.append(survivor)
    sources = [make_photo(tmp_path / "in" / f"{i:02d}.jpg", (3000, 2000), seed=i) for i in range(16)]
    out = tmp_path / "out"
    pairs = [(str(s), str(out / s.name.replace(".jpg", ".png"))) for s in sources]
    plan = build_resize(pairs, 1500, str(out), batch_size=2)
    on_queue(plan, queue)
    group_id = submit(app, plan, 600)
    deadline = time.monotonic() + 60
    while not (in_flight := running(app, doomed)):
        assert time.monotonic() < deadline, "the doomed worker never got a batch"
        time.sleep(0.05)
    assert doomed.process is not None
    os.kill(doomed.process.pid, signal.SIGKILL)
    kill_all(doomed)  # its pool too, as losing the machine would
    outcome = wait(app, plan, group_id, timeout=120)
    assert (outcome["failed"], outcome["errors"]) == (0, [])
    assert [r["source"] for r in outcome["results"]] == [str(s) for s in sources]
    assert sorted(p.name for p in out.glob("[0-9]*.png")) == sorted(Path(d).name for _, d in pairs)
    survivor_log = (tmp_path / "survivor-resize.log").read_text()
    assert any(task_id in survivor_log for task_id in in_flight), "the lost batch was not redelivered"
    report = outcome.get("reduced") or {}
    assert report.get("manifest") == str(out / "manifest.json")


def test_the_soft_time_limit_stops_a_real_resize_at_its_item(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    # A named pipe with no writer: opening it blocks in a system call, as a hung
    # network read would, until the soft time limit's signal interrupts it.
    inputs = tmp_path / "in"
    small = [make_photo(inputs / f"{i}.jpg", (300, 200), seed=i) for i in range(3)]
    stuck = inputs / "stuck.jpg"
    os.mkfifo(stuck)
    sources = [small[0], small[1], stuck, small[2]]
    out = tmp_path / "out"
    plan = build_resize([(str(s), str(out / s.name)) for s in sources], 64, str(out), batch_size=4)
    for header in plan.signature.tasks:
        header.set(time_limit=4, soft_time_limit=2)
    outcome = wait(app, plan, submit(app, plan, 600), timeout=60)
    assert [r is not None for r in outcome["results"]] == [True, True, False, False]
    assert [(e["index"], e["error"]) for e in outcome["errors"]] == [
        (2, "the batch reached its soft time limit (2 s) while it ran"),
        (3, "not started: the batch reached its soft time limit (2 s) first"),
    ]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["0.jpg", "1.jpg"]


def test_as_completed_yields_every_index_once_when_a_worker_is_killed_mid_run(
    app: Celery, tmp_path: Path, workers_started: list[LocalWorker]
) -> None:
    from orchestrator.jobs import Failure, Job
    from tests.faultkit import rigged_job

    queue = new_queue()
    doomed = worker(app, queue, tmp_path, "doomed-stream", env=QUICK)
    workers_started.append(doomed)
    workers_started.append(worker(app, queue, tmp_path, "survivor-stream", env=QUICK))
    values = list(range(40))
    plan = rigged_job(app, values, 2, queue, seconds=0.3)
    job = Job(plan, submit(app, plan, 600), app)
    seen: list[int] = []
    for index, value in job.as_completed(timeout=120):
        assert not isinstance(value, Failure) and value == 2 * values[index]
        seen.append(index)
        if len(seen) == 4:  # under way: kill the doomed worker while it holds a batch
            deadline = time.monotonic() + 30
            while not (in_flight := running(app, doomed)):
                assert time.monotonic() < deadline, "the doomed worker holds no batch"
                time.sleep(0.02)
            assert doomed.process is not None
            os.kill(doomed.process.pid, signal.SIGKILL)
            kill_all(doomed)
    assert sorted(seen) == values and len(seen) == len(set(seen))
    survivor_log = (tmp_path / "survivor-stream.log").read_text()
    assert any(task_id in survivor_log for task_id in in_flight), "the lost batch was not redelivered"
