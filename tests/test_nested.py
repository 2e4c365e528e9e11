"""Nested fan-out: a task may send a fan-out of its own, but never wait on one.

A wait inside a task holds a pool process while its job's batches queue for one:
it is refused at once (``fanout.WaitInsideTask``), by Celery's own flag, rather
than left to end at the soft time limit.  ``fanout.submit`` inside a task works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.result import denied_join_result

import fanout
from orchestrator.local import LocalWorker
from orchestrator.plan import JobSpec
from tests import userjobs

# What every refusal says: why, and what to do instead.
WHY = "would need the worker pool processes that this task holds"
INSTEAD = "fanout.submit(...) and return its job.id"


@pytest.fixture
def in_a_pool_process() -> Iterator[None]:
    """This process as Celery marks a prefork pool process (``celery.result.denied_join_result``)."""
    with denied_join_result():
        yield


def offline_job() -> fanout.Job:
    """A job whose app points at a port where no Redis listens: any read of it would fail."""
    url = "redis://127.0.0.1:9/0"
    app = Celery("offline", broker=url, backend=url, set_as_current=False)
    return fanout.Job("j", "g", JobSpec("tests.userjobs.triple"), 1, 1, 1, app=app)


def test_map_inside_a_task_is_refused_saying_why_and_what_to_do_and_nothing_is_sent(
    in_a_pool_process: None, redis_client: redis.Redis
) -> None:
    before = set(redis_client.keys("fanout:job:*"))
    with pytest.raises(fanout.WaitInsideTask, match=r"^refused: fanout\.map inside a task") as info:
        fanout.map(userjobs.triple, [1, 2])
    assert WHY in str(info.value) and INSTEAD in str(info.value) and "reduce=" in str(info.value)
    assert isinstance(info.value, RuntimeError)  # as Celery's own refusal of result.get() is
    assert set(redis_client.keys("fanout:job:*")) == before


@pytest.mark.parametrize(
    "wait",
    [
        lambda job: job.wait(5),
        lambda job: job.results(5),
        lambda job: next(job.as_completed(5)),
    ],
    ids=["wait", "results", "as_completed"],
)
def test_every_wait_of_a_job_inside_a_task_is_refused_before_it_reads_anything(
    in_a_pool_process: None, wait: Callable[[fanout.Job], object]
) -> None:
    start = time.monotonic()
    with pytest.raises(fanout.WaitInsideTask, match=r"^refused: waiting for job j inside a task") as info:
        wait(offline_job())
    assert WHY in str(info.value) and INSTEAD in str(info.value)
    assert time.monotonic() - start < 1  # no Redis was asked: it would have failed, after retries


@pytest.mark.system
@pytest.mark.parametrize("task", [userjobs.map_inside, userjobs.wait_inside], ids=["map", "wait"])
def test_a_task_that_waits_on_its_own_fan_out_fails_its_items_at_once_saying_why(
    worker: LocalWorker, task: fanout.FanoutTask[[int], list[int]]
) -> None:
    # Two items in two batches hold both of the worker's pool processes: before, each inner
    # wait sat there until the soft time limit (20 s), whose message did not say why.
    start = time.monotonic()
    outcome = fanout.map(task, [1, 2], batch_size=1, timeout=60)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert (outcome.succeeded, outcome.failed) == (0, 2)
    assert [f.index for f in outcome.errors] == [0, 1]
    for failure in outcome.errors:
        assert failure.error.startswith("WaitInsideTask: refused: "), failure.error
        assert WHY in failure.error and INSTEAD in failure.error


@pytest.mark.system
def test_a_two_level_fan_out_folders_then_the_files_of_each_folder(
    worker: LocalWorker, tmp_path: Path
) -> None:
    # The outer job's task sends one inner job per folder and returns its id; this process,
    # which may wait, attaches each inner job and waits for it.
    folders: dict[str, dict[str, str]] = {}
    for f in range(3):
        folder = tmp_path / f"folder{f}"
        folder.mkdir()
        folders[str(folder)] = {}
        for n in range(2 + f):
            path = folder / f"file{n}.txt"
            path.write_text(f"folder {f} file {n}\n")
            folders[str(folder)][str(path)] = f"folder {f} file {n}"
    outer = fanout.map(userjobs.submit_folder, list(folders), batch_size=1, timeout=60)
    assert outer.ok, outer.errors
    assert len(set(outer.results)) == len(folders)
    for (name, files), job_id in zip(folders.items(), outer.results, strict=True):
        inner = fanout.Job.attach(job_id)
        assert inner.task == "tests.userjobs.needs_file" and inner.total == len(files), name
        outcome = inner.wait(60)
        assert outcome.ok, outcome.errors
        assert outcome.results == [files[path] for path in sorted(files)]
