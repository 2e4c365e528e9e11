"""Faults on the real tasks, not rigged ones: a worker killed mid-resize, and the soft time limit.

``tests/test_faults.py`` proves each guarantee with a rigged task; these run
``fanout.resize_items`` itself, so its own code path (the header wrapper, its
retries, the report as its reduce) is what is killed and interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from orchestrator.local import LocalWorker
from orchestrator.samples import make_photo
from tests.faultkit import QUICK, busy, kill_all, log_of, new_queue, resize_job, rigged_job, send

pytestmark = pytest.mark.system


def test_kill_9_of_a_worker_mid_resize_loses_no_image(
    app: Celery, tmp_path: Path, start_worker: Callable[..., LocalWorker]
) -> None:
    queue = new_queue()
    doomed = start_worker(app, queue, "doomed-resize", env=QUICK)
    survivor = start_worker(app, queue, "survivor-resize", env=QUICK)
    sources = [make_photo(tmp_path / "in" / f"{i:02d}.jpg", (3000, 2000), seed=i) for i in range(16)]
    out = tmp_path / "out"
    pairs = [(str(s), str(out / s.name.replace(".jpg", ".png"))) for s in sources]
    sent = send(app, resize_job(pairs, 1500, out, batch_size=2, queue=queue))
    in_flight = busy(app, doomed, timeout=60)
    kill_all(doomed)  # its pool too, as losing the machine would
    outcome = sent.wait(timeout=120)
    assert (outcome["failed"], outcome["errors"]) == (0, [])
    assert [r["source"] for r in outcome["results"]] == [str(s) for s in sources]
    assert sorted(p.name for p in out.glob("[0-9]*.png")) == sorted(Path(d).name for _, d in pairs)
    survivor_log = log_of(survivor)
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
    plan = resize_job([(str(s), str(out / s.name)) for s in sources], 64, out, batch_size=4, limits=(4, 2))
    outcome = send(app, plan).wait(timeout=60)
    assert [r is not None for r in outcome["results"]] == [True, True, False, False]
    assert [(e["index"], e["error"]) for e in outcome["errors"]] == [
        (2, "the batch reached its soft time limit (2 s) while it ran"),
        (3, "not started: the batch reached its soft time limit (2 s) first"),
    ]
    assert sorted(p.name for p in out.glob("[0-9].jpg")) == ["0.jpg", "1.jpg"]


def test_as_completed_yields_every_index_once_when_a_worker_is_killed_mid_run(
    app: Celery, start_worker: Callable[..., LocalWorker]
) -> None:
    import fanout

    queue = new_queue()
    doomed = start_worker(app, queue, "doomed-stream", env=QUICK)
    survivor = start_worker(app, queue, "survivor-stream", env=QUICK)
    values = list(range(40))
    job = send(app, rigged_job(app, values, 2, queue, seconds=0.3)).job
    seen: list[int] = []
    in_flight: set[str] = set()
    for index, value in job.as_completed(timeout=120):
        assert not isinstance(value, fanout.Failure) and value == 2 * values[index]
        seen.append(index)
        if len(seen) == 4:  # under way: kill the doomed worker while it holds a batch
            in_flight = busy(app, doomed)
            kill_all(doomed)
    assert sorted(seen) == values and len(seen) == len(set(seen))
    survivor_log = log_of(survivor)
    assert any(task_id in survivor_log for task_id in in_flight), "the lost batch was not redelivered"
