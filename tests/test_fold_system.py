"""The fold with real workers and a real Redis: by reference, a batch run twice, a fold that raises.

The session's worker imports ``examples.wordcount`` and ``tests.userjobs`` (their
folding tasks); the fault tests start workers of their own that know
``fanout.test.rigged_fold`` (tests/faulty.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery

import fanout
from bench.wordfold import lines, pool
from examples.wordcount import count_locally, words
from orchestrator.local import LocalWorker
from tests import userjobs
from tests.faultkit import deliver_first_batch_twice, new_queue, rigged_job, runs_of, send, wait_until
from workers import keys, results, running
from workers.settings import get_settings

pytestmark = pytest.mark.system


def test_word_count_by_reference_equals_a_local_counter_with_failed_lines_by_index(
    by_ref_here: Path, worker: LocalWorker
) -> None:
    text: list[object] = list(lines(6000, pool(512)))
    for index in (5, 4321):
        text[index] = None  # not a line: the item fails (AttributeError), the others are counted
    job = fanout.submit(words, text, batch_size=100)  # 60 batches: the running total takes most
    outcome = job.wait(120)
    assert outcome.by_reference and outcome.reduce_error is None
    assert Counter(outcome.reduced) == count_locally(t for t in text if isinstance(t, str))
    assert [(f.index, f.input) for f in outcome.errors] == [(5, None), (4321, None)]
    assert "AttributeError" in outcome.errors[0].error
    assert (outcome.total, outcome.succeeded, outcome.failed) == (6000, 5998, 2)
    assert outcome.results == [] and list(job.results()) == []  # a fold keeps no per-item results
    # The header tasks merged partials as they arrived: a running total was written; the
    # callback removed the pending list, and the total's key expires with the job's results.
    assert list((by_ref_here / job.id / "fold").glob("total-*.json"))
    client = redis.Redis.from_url(get_settings().result_backend)
    assert not client.exists(keys.fold_pending(job.group_id))
    assert 0 < client.ttl(keys.fold_total(job.group_id)) <= get_settings().result_expires
    # A part carries its partial and failures, not the results of its items.
    part = json.loads(next((by_ref_here / job.id / "parts").iterdir()).read_text())
    assert part["results"] == [] and part["count"] == 100 and isinstance(part["partial"], dict)


@pytest.mark.parametrize("reference", [False, True], ids=["inline", "by-reference"])
def test_a_step_that_raises_completes_the_outcome_with_a_reduce_error_naming_the_item(
    reference: bool, by_ref_here: Path, worker: LocalWorker
) -> None:
    items: list[object] = list(range(400 if reference else 99))
    items[7] = "seven"
    outcome = fanout.map(userjobs.unlucky, items, batch_size=10, timeout=120)
    assert outcome.by_reference is reference
    assert outcome.reduced is None
    assert outcome.reduce_error == (
        "tests.userjobs.unlucky: the fold's step raised at item 13: ValueError: 13 is unlucky"
    )
    assert [(f.index, f.input) for f in outcome.errors] == [(7, "seven")]  # still every failure
    assert not outcome.ok


def test_a_merge_that_raises_completes_the_outcome_with_a_reduce_error(worker: LocalWorker) -> None:
    outcome = fanout.map(userjobs.unmergeable, list(range(50)), batch_size=10, timeout=120)
    assert outcome.reduced is None and (outcome.total, outcome.failed) == (50, 0)
    assert outcome.reduce_error == (
        "tests.userjobs.unmergeable: the fold's merge raised at the batch of item 0: "
        "RuntimeError: this merge refuses every partial"
    )


def test_a_fold_leaves_failures_out_by_index_takes_no_reduce_and_no_retry(worker: LocalWorker) -> None:
    items: list[object] = list(range(1, 200))
    items[12] = 12.5
    job = fanout.submit(userjobs.unlucky, items, batch_size=16)  # 13 (index 12) is 12.5 here
    outcome = job.wait(120)
    expected = sum(i for i in items if isinstance(i, int))
    assert (outcome.reduced, [f.index for f in outcome.errors]) == (expected, [12])
    with pytest.raises(fanout.InputError, match="cannot be retried"):  # its value would need merging
        job.retry_failed()
    with pytest.raises(fanout.InputError, match="it takes no reduce"):
        fanout.submit(userjobs.unlucky, [1], reduce=userjobs.total)


@pytest.mark.parametrize("reference", [False, True], ids=["inline", "by-reference"])
def test_a_batch_delivered_twice_is_folded_once(
    reference: bool, app: Celery, tmp_path: Path, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    queue = new_queue()
    values = [100, *range(1, 40)]  # the first batch, the one delivered twice, adds 200
    job = rigged_job(
        app, values, 1, queue, seconds=0.05, marks=marks, limits=None, task="fanout.test.rigged_fold",
        kwargs={"seconds": 0.05, "marks": str(marks)}, fold=True,
        results_root=tmp_path / "r" if reference else None,
    )  # fmt: skip
    sent = send(app, job)
    deliver_first_batch_twice(app, queue)
    start_worker(app, queue, "twice")
    outcome = sent.wait(timeout=90)
    assert runs_of(marks)["100"] == 2, "the copy should have run too"
    assert outcome["reduced"] == sum(2 * v for v in values), "folded twice, the sum would be 200 more"
    if reference:  # both runs wrote a part; one was merged
        parts = [p.name.split("-")[0] for p in (tmp_path / "r" / job.job_id / "parts").iterdir()]
        assert parts.count(f"{0:012d}") == 2


def test_rounds_merge_a_pending_batch_once_and_the_callback_only_what_they_did_not(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The running total against the real Redis, without a worker: rounds, a duplicate, a lost round."""
    from workers.core import json_problem
    from workers.fanin import run_batch
    from workers.folding import Fold, fold_part, merge_folded

    fold = Fold(lambda total, value: total + value, initial=0)
    group, where = "fold-test-group", str(tmp_path)
    refs = []
    for start in range(0, 40, 2):
        part = fold_part(fold, run_batch(int, start, [start, start + 1]), json_problem)
        refs.append(dict(results.write_part(where, part)))
    for ref in refs[:16]:  # the 16th offer starts a round
        running.offer(redis_client, group, where, fold, ref, 30, 60)
    assert redis_client.llen(keys.fold_pending(group)) == 0
    running.offer(redis_client, group, where, fold, refs[0], 30, 60)  # batch 0 reported again
    for ref in refs[16:18]:
        running.offer(redis_client, group, where, fold, ref, 30, 60)
    # Another process holds the lock (a round under way): no round here, nothing lost.
    redis_client.set(keys.fold_lock(group), "someone", px=30_000)
    assert running.merge_round(redis_client, group, where, fold, 30, 60) == 0
    redis_client.delete(keys.fold_lock(group))
    assert running.merge_round(redis_client, group, where, fold, 30, 60) == 3
    total = running.snapshot(redis_client, group)
    assert total is not None and total["value"] == sum(range(36))
    assert [c[0] for c in total["covered"]] == list(range(0, 36, 2))
    # The callback: the total, plus the two partials no round merged, each index once.
    failures: list[object] = []
    done = merge_folded(refs, 40, fold, lambda r: results.read_part(r["url"]), failures.append, running=total)
    assert (done.value, done.error, failures) == (sum(range(40)), None, [])
    running.forget(redis_client, group)


def test_fanout_map_of_a_folding_task_prints_the_folded_value(
    cli_env: dict[str, str], worker: LocalWorker, tmp_path: Path
) -> None:
    import subprocess

    from tests.conftest import fanout_command

    source = tmp_path / "lines.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in ["the cat", None, "The hat"]) + "\n")
    proc = subprocess.run(
        fanout_command("map", "examples.wordcount:words", "--input", str(source), "--no-progress"),
        env=cli_env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # one line failed
    assert json.loads(proc.stdout) == {"the": 2, "cat": 1, "hat": 1}
    assert "failed item 1 (None): AttributeError" in proc.stderr, (
        proc.stderr
    )  # named by index, with its reason


def test_a_cancelled_fold_counts_each_finished_item_once_and_the_rest_as_cancelled(
    by_ref_here: Path, worker: LocalWorker
) -> None:
    job = fanout.submit(userjobs.slow_one, [0.02] * 2000, batch_size=10)
    wait_until(lambda: job.progress().batches_done >= 20, 60, "20 batches done (rounds have run)")
    job.cancel()  # queued batches are taken off the queue: their parts have no partial
    outcome = job.wait(timeout=60)
    assert outcome.by_reference and outcome.data.get("stopped") == "cancelled"
    assert outcome.reduce_error is None
    assert 0 < outcome.succeeded < 2000 and outcome.succeeded + outcome.failed == 2000
    assert outcome.reduced == outcome.succeeded  # every finished item once, no cancelled one
    assert {f.error for f in outcome.errors} == {"cancelled"}
    assert sorted({f.index for f in outcome.errors}) == [f.index for f in outcome.errors]


def test_a_pool_process_killed_mid_batch_has_its_batch_folded_once(
    app: Celery, tmp_path: Path, start_worker: Callable[..., LocalWorker], marks: Path
) -> None:
    from tests.faultkit import QUICK
    from tests.faulty import KILL_ONCE

    queue = new_queue()
    start_worker(app, queue, "oom", env=QUICK)
    values: list[object] = list(range(40))
    values[25] = [KILL_ONCE, 25, "item25"]  # SIGKILLs its pool process the first time, as the OOM killer
    job = rigged_job(
        app, values, 2, queue, marks=marks, task="fanout.test.rigged_fold", fold=True,
        kwargs={"seconds": 0.0, "marks": str(marks)}, results_root=tmp_path / "r",
    )  # fmt: skip
    outcome = send(app, job).wait(90)
    assert (marks / "['once',25,'item25']").exists(), "the item never killed its process"
    assert outcome.get("reduce_error") is None and outcome["failed"] == 0
    assert outcome["reduced"] == sum(2 * v for v in range(40))
