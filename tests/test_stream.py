"""Streamed jobs (orchestrator/stream.py): input read once and spooled, batches sized by time.

A low FANOUT_BY_REFERENCE_ITEMS makes small inputs stream, so that real workers
run them in seconds.  Unit tests of the pure pieces (the line check, the sizer)
need no Redis.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import fanout
from orchestrator import render
from orchestrator.plan import JobSpec, prepare
from orchestrator.stream import MAX_AUTO_ITEMS, START_ITEMS, JsonLines, Sizer, check_lines, spool
from tests import userjobs
from tests.conftest import fanout_command
from workers import keys
from workers.batches import batch_items, slice_ref
from workers.errors import InputError
from workers.settings import get_settings

# --- without Redis ------------------------------------------------------------------------------


def test_check_lines_accepts_json_lines_and_names_the_first_bad_one() -> None:
    check_lines(["1\n", '"a"\n', '{"x": [1, 2]}\n', " 3 \n"], 1)  # spaces around a value: still one value
    refused = (("[1\n", "line 12 is not JSON"), ("1, 2\n", "line 12 is not JSON"), ("\n", "line 12 is empty"))
    for bad, reason in refused:
        with pytest.raises(InputError, match=reason):
            check_lines(["1\n", bad, "2\n"], 11)


def test_lines_that_only_make_json_together_are_refused() -> None:
    # Each line alone is not one value, though the joined chunk would parse as a list of three.
    with pytest.raises(InputError, match="line 1 is not JSON"):
        check_lines(["[[1\n", "]]\n", "5],[6\n"], 1)


def test_map_output_written_a_chunk_at_a_time_is_the_same_as_line_by_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(render, "WRITE_LINES", 4)  # two slices
    values = [1, "a", None, {"x": [1.5, "\u00e9"]}, float("nan"), [True]]
    cases: list[list[dict[str, Any]]] = [[], [{"index": 2, "input": 7, "error": "TypeError: no"}]]
    for errors in cases:
        outcome: Any = {"job_id": "j", "task": "t", "total": 6, "results": values, "errors": errors}
        fast, slow = io.StringIO(), io.StringIO()
        render.write_jsonl(outcome, fast)
        failed = {int(e["index"]): str(e["error"]) for e in errors}
        for index, value in enumerate(values):
            render.write_jsonl_line(index, value, failed.get(index), slow)
        assert fast.getvalue() == slow.getvalue()


def test_spool_writes_chunks_that_batches_slice_across(tmp_path: Path) -> None:
    where = str(tmp_path / "job")
    lines = JsonLines(f'{{"i": {i}}}\n' for i in range(25))
    assert spool(lines, where, 10) == 25
    assert sorted(p.name for p in (tmp_path / "job" / "inputs").iterdir()) == [
        f"chunk-{n:09d}.json" for n in range(3)
    ]
    assert batch_items(slice_ref(where, 7, 23, 10)) == [{"i": i} for i in range(7, 23)]
    assert spool(iter(range(5)), str(tmp_path / "ints"), 2) == 5


def test_spool_of_a_generator_names_the_item_json_cannot_carry(tmp_path: Path) -> None:
    def items() -> Iterator[object]:
        yield from range(15)
        yield {1, 2}

    with pytest.raises(InputError, match="item 15 is not JSON"):
        spool(items(), str(tmp_path / "job"), 10)


def test_a_short_iterator_is_an_ordinary_job_and_a_long_one_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_BY_REFERENCE_ITEMS", "10")
    get_settings.cache_clear()
    try:
        spec = JobSpec("t")
        short = prepare(spec, JsonLines(iter(["1\n", "2\n"])))
        assert not short.streamed and list(short.items) == [1, 2]
        long = prepare(spec, (i for i in range(11)))
        assert long.streamed and long.spec.where and not long.items
        assert list(long.source or ()) == list(range(11))  # nothing read twice, nothing lost
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_sizer_grows_with_cheap_items_and_stays_small_with_slow_ones() -> None:
    def run(item_s: float, batches: int) -> list[int]:
        sizer, now, sizes = Sizer(processes=2), 0.0, []
        for _ in range(batches):
            size = sizer.next_size(10**9)
            sizes.append(size)
            sizer.sent(size, now)
            if len(sizer.pending) >= sizer.ahead:  # two processes run the two oldest
                now += max(0.002 + sizer.pending[0] * item_s, 0.02)
                sizer.done(2, now)
        return sizes

    cheap, slow = run(1e-6, 40), run(0.3, 40)
    assert cheap[0] == START_ITEMS and cheap[-1] >= 100_000 and max(cheap) <= MAX_AUTO_ITEMS
    assert max(slow) <= 5 and slow[-1] >= 2
    assert Sizer(2, fixed=7).next_size(100) == 7 and Sizer(2, cap=3).cap == 3


def test_sizer_makes_the_last_batches_small() -> None:
    sizer = Sizer(processes=2)
    sizer.size = 1000
    assert sizer.next_size(100_000) == 1000 and sizer.next_size(400) == 100


# --- with real workers --------------------------------------------------------------------------


@pytest.fixture
def streamed_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**cli_env, "FANOUT_BY_REFERENCE_ITEMS": "100", "FANOUT_RESULTS_URL": str(tmp_path / "results")}


def starts_of(client: redis.Redis, job_id: str) -> list[int]:
    raw = bytes(client.get(keys.starts(job_id)) or b"")  # type: ignore[arg-type]
    return [int.from_bytes(raw[i : i + 8], "big") for i in range(0, len(raw), 8)]


@pytest.mark.system
def test_a_generator_streams_with_its_results_in_input_order(
    by_ref_here: Path, worker: object, redis_client: redis.Redis
) -> None:
    n = 3000
    job = fanout.submit(userjobs.triple, (i if i != 1234 else "x" for i in range(n)))
    assert job.spec.chunk and job.total == n
    outcome = job.wait(120)
    assert outcome.results == [None if i == 1234 else 3 * i for i in range(n)]
    assert [(f.index, f.input) for f in outcome.errors] == [(1234, "x")]
    starts = starts_of(redis_client, job.id)
    assert len(starts) == job.batches and starts[0] == 0 and starts == sorted(set(starts))
    # Kept in chunks, not in Redis: a retry finds its failed item there.
    assert (by_ref_here / job.id / "inputs" / "chunk-000000000.json").exists()
    assert job.items_at([1234, 2999]) == ["x", 2999]


@pytest.mark.system
def test_map_input_from_stdin_streams_and_prints_in_input_order(
    streamed_env: dict[str, str], worker: object
) -> None:
    n = 2500
    stdin = "".join(f"{i}\n" for i in range(n))
    done = subprocess.run(
        fanout_command("map", "tests.userjobs:triple", "--input", "-", "--no-progress"),
        env=streamed_env, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows == [{"index": i, "result": 3 * i} for i in range(n)]


@pytest.mark.system
def test_a_bad_line_late_in_the_input_refuses_the_job_and_nothing_runs(
    streamed_env: dict[str, str], worker: object, redis_client: redis.Redis, tmp_path: Path, app: Celery
) -> None:
    marks = tmp_path / "ran"
    lines = [json.dumps([str(marks), i]) + "\n" for i in range(30_000)]
    lines[29_000] = '{"not": json}\n'
    before = set(redis_client.keys("fanout:job:*"))
    done = subprocess.run(
        fanout_command("map", "tests.userjobs:mark", "--input", "-", "--no-progress"),
        env=streamed_env, input="".join(lines), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "line 29001 is not JSON" in done.stderr
    assert set(redis_client.keys("fanout:job:*")) == before  # no job recorded...
    assert redis_client.llen(get_settings().queue) == 0  # ...no batch queued...
    assert not marks.exists()  # ...none ran
    results_dir = tmp_path / "results"
    assert not results_dir.exists() or not any(results_dir.iterdir())  # ...and no input kept


@pytest.mark.system
def test_a_streamed_job_whose_batches_redis_dropped_is_healed_from_its_chunks(
    by_ref_here: Path, worker: object, app: Celery, redis_client: redis.Redis
) -> None:
    from tests.test_healing import healed, take_message

    values = [0.1 + (k % 3) / 100 for k in range(160)]
    # Given a streamed job (a generator) of 54 batches, the last of one item
    job = fanout.submit(userjobs.sleepy, iter(values), batch_size=3)
    assert job.spec.chunk and job.batches == 54
    # When Redis drops two of its queued messages, one in the middle and the last
    take_message(redis_client, get_settings().queue, job.group_id, 30)
    take_message(redis_client, get_settings().queue, job.group_id, 53)
    # Then the healer sends both again, each with its own items read from the chunks
    outcome = job.wait(120)
    assert outcome.results == values and outcome.failed == 0
    assert healed(redis_client, job.id) == 2


def sizes_of(client: redis.Redis, job: fanout.Job) -> list[int]:
    """The sizes of a streamed job's batches, in order, as keys.starts records them."""
    starts = starts_of(client, job.id)
    return [b - a for a, b in zip(starts, [*starts[1:], job.total], strict=True)]


@pytest.mark.system
def test_auto_batches_grow_with_cheap_items_and_stay_small_with_slow_ones(
    by_ref_here: Path, worker: object, redis_client: redis.Redis
) -> None:
    # Cheap items (a multiplication): from one item, to thousands once the first batches are timed
    cheap = fanout.submit(userjobs.triple, iter(range(200_000)))
    assert cheap.wait(120).failed == 0
    sizes = sizes_of(redis_client, cheap)
    assert sizes[0] == 1 and max(sizes) >= 5_000 and sum(sizes) == 200_000
    # Slow items (0.25 s each): a batch of about a second holds a handful
    slow = fanout.submit(userjobs.sleepy, iter([0.25] * 120))
    assert slow.wait(120).results == [0.25] * 120
    sizes = sizes_of(redis_client, slow)
    assert sizes[0] == 1 and max(sizes) <= 12 and len(sizes) >= 15
    # A cap the task sets holds
    capped = fanout.submit(userjobs.double, iter(range(30_000)))
    assert capped.wait(120).failed == 0 and max(sizes_of(redis_client, capped)) <= 10_000


@pytest.mark.system
def test_a_chord_whose_parts_are_all_in_before_its_size_is_set_is_completed_by_the_client(
    by_ref_here: Path, worker: object, app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import stream
    from orchestrator.follow import batches_done
    from tests.faultkit import wait_until

    closed: list[bool] = []
    close = stream.close_chord

    def late(app: Celery, group_id: str, size: int, callback: dict[str, object]) -> bool:
        # Every part reports before the chord knows its size: none of them can complete it.
        wait_until(lambda: batches_done(app, group_id) == size, 60, "every batch to report")
        closed.append(close(app, group_id, size, callback))
        return closed[-1]

    monkeypatch.setattr(stream, "close_chord", late)
    job = fanout.submit(userjobs.triple, iter(range(500)), batch_size=50)
    assert closed == [True]
    assert job.wait(60).results == [3 * i for i in range(500)]


@pytest.mark.system
def test_without_kombus_helpers_a_streamed_job_goes_through_send_task(
    by_ref_here: Path, worker: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.transport import virtual as kombu_virtual

    from orchestrator import publish

    # Given a kombu whose _lookup answers in another shape (the bulk path cannot frame messages)
    monkeypatch.setattr(publish, "_fallback_logged", False)
    monkeypatch.setattr(
        kombu_virtual.Channel, "_lookup", lambda self, exchange, routing_key, default=None: None
    )
    # Then a streamed job's batches go one by one through Celery's send_task, and it completes
    job = fanout.submit(userjobs.triple, iter(range(700)))
    assert job.wait(60).results == [3 * i for i in range(700)]
    assert publish._fallback_logged


def test_a_streamed_recipe_rebuilds_batches_of_their_own_sizes_from_their_starts() -> None:
    from workers.healing import Recipe, Unhealable

    record: dict[str, Any] = {
        "job_id": "j",
        "group_id": "g",
        "total": 1000,
        "batch_size": 600,
        "batches": 4,
        "spec": {"where": "/r/j", "chunk": 100},
        "heal": {"task": "t", "queue": "q", "tail": [None, "/r/j"], "callback": {"task": "fanout.collect"}},
    }
    recipe = Recipe.from_record(record)
    assert recipe is not None and recipe.inputs == "chunks"
    starts = b"".join(start.to_bytes(8, "big") for start in (0, 1, 21, 400))  # sizes 1, 20, 379, 600
    assert recipe.items_of(2, None, starts[16:32]) == slice_ref("/r/j", 21, 400, 100)
    assert recipe.bounds(3, starts[24:]) == (400, 1000)  # the last batch ends with the job
    with pytest.raises(Unhealable, match="no longer in Redis"):
        recipe.bounds(1, b"")
