"""The fold (workers/folding.py): batches folded into partials, partials merged once each, in order.

Pure functions, no broker: the system tests are in tests/test_fold_system.py.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

import fanout
from workers.core import json_problem
from workers.errors import BadTask
from workers.fanin import ItemFailure, Part, run_batch
from workers.folding import Fold, fold_part, merge_folded
from workers.results import LOST


def add(total: Counter[str], words: Any) -> Counter[str]:
    total.update(words)
    return total


COUNT = Fold(add, initial=Counter)


def batch(start: int, items: list[Any], fn: Any = str.split) -> Part:
    return fold_part(COUNT, run_batch(fn, start, items), json_problem)


def merged(
    parts: list[Any], total: int, fold: Fold[Any] | None = COUNT
) -> tuple[Any, str | None, list[ItemFailure]]:
    failures: list[ItemFailure] = []
    done = merge_folded(parts, total, fold, lambda ref: ref["file"], failures.append)
    assert done.failed == len(failures)
    return done.value, done.error, failures


def test_a_batch_reports_its_partial_and_failures_not_its_results() -> None:
    part = batch(10, ["a b", None, "b c"])
    assert part["results"] == [] and part["count"] == 3
    assert part["partial"] == {"a": 1, "b": 2, "c": 1}
    assert [(e["index"], e["input"]) for e in part["errors"]] == [(11, None)]
    assert json.loads(json.dumps(part)) == part  # what travels is JSON


def test_partials_merge_to_what_one_counter_over_every_item_gives() -> None:
    lines = [f"w{i % 7} w{i % 3} x" for i in range(100)]
    parts = [batch(start, lines[start : start + 8]) for start in range(0, 100, 8)]
    value, error, failures = merged(list(reversed(parts)), 100)  # in any order of arrival
    assert error is None and failures == []
    assert value == Counter(word for line in lines for word in line.split())


def test_a_batch_reported_twice_is_merged_once_and_a_gap_is_lost() -> None:
    parts = [batch(0, ["a", "a"]), batch(2, ["b", "b"]), batch(0, ["a", "a"]), batch(6, ["c", "c"])]
    value, error, failures = merged(parts, 8)
    assert error is None
    assert value == {"a": 2, "b": 2, "c": 2}
    assert [(f["index"], f["error"]) for f in failures] == [(4, LOST), (5, LOST)]


def test_a_part_overlapping_one_already_merged_is_left_out_and_its_uncovered_items_lost() -> None:
    parts = [batch(0, ["a", "a", "a"]), batch(2, ["b", "b"])]  # 2 is in both: b's partial cannot be split
    value, _, failures = merged(parts, 4)
    assert value == {"a": 3}
    assert [f["index"] for f in failures] == [3]


def test_references_are_read_one_at_a_time_and_their_inline_failures_used() -> None:
    reads: list[int] = []
    files = {0: batch(0, ["a", None]), 2: batch(2, ["b", "c"])}

    def read(ref: Any) -> Part:
        reads.append(ref["start"])
        return files[ref["start"]]

    refs = [
        {"start": s, "count": 2, "url": f"f{s}", "failed": len(p["errors"]), "errors": p["errors"]}
        for s, p in files.items()
    ]
    failures: list[ItemFailure] = []
    done = merge_folded(refs, 4, COUNT, read, failures.append)
    assert done.value == {"a": 1, "b": 1, "c": 1} and reads == [0, 2]
    assert [f["index"] for f in failures] == [1]


def test_a_cancelled_batch_has_no_partial_and_its_run_of_failures_counts_one_per_item() -> None:
    cancelled = {
        "start": 2,
        "results": [None] * 3,
        "errors": [{"index": 2, "input": None, "error": "cancelled", "count": 3}],
        "transient": 0,
    }
    value, error, failures = merged([batch(0, ["a", "b"]), cancelled], 5)
    assert error is None and value == {"a": 1, "b": 1}
    assert [(f["index"], f["error"]) for f in failures] == [
        (2, "cancelled"),
        (3, "cancelled"),
        (4, "cancelled"),
    ]


def test_a_step_that_raises_names_the_item_and_the_merge_reports_it_with_every_failure() -> None:
    def step(total: Counter[str], words: Any) -> Counter[str]:
        if "boom" in words:
            raise ValueError("no booms")
        return add(total, words)

    fold = Fold(step, merge=add, initial=Counter)
    broken = fold_part(fold, run_batch(str.split, 4, ["a", "boom", None]), json_problem)
    assert "partial" not in broken
    assert broken["fold_error"] == "the fold's step raised at item 5: ValueError: no booms"
    value, error, failures = merged([batch(0, ["a"] * 4), broken], 7, fold)
    assert value is None and error == broken["fold_error"]
    assert [f["index"] for f in failures] == [6]  # the failures are all there still


def test_a_merge_that_raises_and_a_partial_that_is_not_json_are_errors_not_exceptions() -> None:
    def bad_merge(total: Any, partial: Any) -> Any:
        raise KeyError("nope")

    value, error, _ = merged(
        [batch(0, ["a"]), batch(1, ["b"])], 2, Fold(add, merge=bad_merge, initial=Counter)
    )
    assert value is None and error == "the fold's merge raised at the batch of item 0: KeyError: 'nope'"
    setlike = fold_part(Fold(lambda s, x: s | {x}, initial=set), run_batch(str, 0, [1]), json_problem)
    assert "set is not JSON" in setlike["fold_error"]


def test_initial_is_copied_for_each_batch_so_a_step_may_change_it_in_place() -> None:
    fold = Fold(lambda acc, x: acc.append(x) or acc, merge=lambda a, b: a + b, initial=[])
    first = fold_part(fold, run_batch(int, 0, [1, 2]), json_problem)
    second = fold_part(fold, run_batch(int, 2, [3]), json_problem)
    assert (first["partial"], second["partial"], fold.initial) == ([1, 2], [3], [])
    assert merged([second, first], 3, fold)[0] == [1, 2, 3]  # in input order


def test_a_stop_mid_merge_reports_how_far_it_got() -> None:
    class Stop(Exception):
        pass

    def merge(total: Any, partial: Any) -> Any:
        if total:
            raise Stop
        return add(total, partial)

    failures: list[ItemFailure] = []
    done = merge_folded(
        [batch(0, ["a"]), batch(1, ["b"])],
        2,
        Fold(add, merge=merge, initial=Counter),
        lambda r: r,
        failures.append,
        stop_on=(Stop,),
    )
    assert done.error == "the merge was stopped by its time limit after 1 of 2 partials"


def test_the_decorator_takes_a_fold_and_refuses_anything_else() -> None:
    @fanout.task(name="tests.test_folding.lengths", fold=fanout.Fold(lambda a, n: a + n, initial=0))
    def length(text: str) -> int:
        return len(text)

    assert length.fold is not None and length("abc") == 3
    with pytest.raises(BadTask, match=r"fold must be a fanout\.Fold"):
        fanout.task(fold=add)  # type: ignore[call-overload]
    with pytest.raises(BadTask, match="step must be a function"):
        Fold("add")  # type: ignore[arg-type]


def test_a_job_of_a_folding_task_tells_its_callback_and_takes_no_reduce() -> None:
    from examples.wordcount import words
    from orchestrator.canvas import callback_job
    from orchestrator.plan import prepare
    from orchestrator.send import spec_of
    from workers.errors import InputError

    spec = spec_of(words)
    assert spec.fold == "examples.wordcount.words"
    assert callback_job(prepare(spec, ["a b"]))["fold"] == "examples.wordcount.words"
    assert "fold" not in callback_job(
        prepare(spec_of(fanout.task(name="tests.test_folding.plain")(str)), ["a"])
    )
    with pytest.raises(InputError, match="folds its results"):
        spec_of(words, reduce=words)
