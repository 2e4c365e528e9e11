"""Unit tests for redelivery accounting, the write-once manifest and the reliability settings (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from workers.app import celery_config, soft_limit
from workers.attempts import MAX_KILLS, run_counted
from workers.doubling import double
from workers.errors import ConfigError
from workers.fanin import Part, merge
from workers.report import write_report
from workers.settings import Settings


class MemoryLog:
    """An AttemptLog in a dict, as Redis would keep it across runs."""

    def __init__(self) -> None:
        self.runs = 0
        self.unfinished: dict[int, int] = {}

    def batch_started(self) -> int:
        self.runs += 1
        return self.runs

    def item_started(self, index: int) -> int:
        self.unfinished[index] = self.unfinished.get(index, 0) + 1
        return self.unfinished[index]

    def item_finished(self, index: int) -> None:
        self.unfinished[index] -= 1


class Died(BaseException):
    """Stands for the pool process dying: nothing after it runs."""


def killing(poison: int) -> Any:
    def work(value: int) -> int:
        if value == poison:
            raise Died
        return double(value)

    return work


def test_a_first_run_keeps_no_per_item_count() -> None:
    log = MemoryLog()
    assert run_counted(double, 0, [1, 2], log)["results"] == [2, 4]
    assert (log.runs, log.unfinished) == (1, {})


def test_a_poison_item_is_failed_after_max_kills_counted_deaths_and_the_rest_goes_on() -> None:
    log, deaths = MemoryLog(), 0
    while True:
        try:
            part = run_counted(killing(12), 10, [10, 11, 12, 13], log)
            break
        except Died:
            deaths += 1
            assert deaths <= MAX_KILLS + 1, "the poison item must not be retried forever"
    assert deaths == MAX_KILLS + 1
    assert part["results"] == [20, 22, None, 26]
    [error] = part["errors"]
    assert error["index"] == 12 and error["input"] == 12
    assert f"died each of the {MAX_KILLS} times" in error["error"]


def test_an_item_that_raises_is_not_counted_as_a_death() -> None:
    log = MemoryLog()
    log.batch_started()  # as if a first run had died
    for _ in range(MAX_KILLS + 2):
        part = run_counted(double, 0, ["x", 3], log)
        assert part["errors"][0]["error"] == "expected an integer, got str"
    assert log.unfinished == {0: 0, 1: 0}


def test_the_manifest_is_written_once(tmp_path: Path) -> None:
    record = {"source": "a", "destination": str(tmp_path / "a.png"), "width": 1, "height": 1, "bytes": 5}
    part: Part = {"start": 0, "results": [record], "errors": [], "transient": 0}
    outcome = merge([part], 1, "job", "resize")
    write_report(str(tmp_path), outcome)
    path = tmp_path / "manifest.json"
    before = path.stat().st_mtime_ns, path.stat().st_ino
    write_report(str(tmp_path), outcome)  # a redelivered callback
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    failed = merge([None], 1, "job", "resize")
    write_report(str(tmp_path), failed)  # a different outcome does replace it
    assert json.loads(path.read_text())["failed"] == 1


def test_reliability_settings_reach_celery() -> None:
    conf = celery_config(Settings.from_env({}))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    transport = conf["broker_transport_options"]
    assert (transport["visibility_timeout"], transport["unacked_restore_interval"]) == (75, 5)
    assert transport["unacked_restore_throttle"] == 1
    assert conf["result_backend"].startswith("workers.backend:RetryingRedisBackend+redis://")
    assert conf["result_backend_always_retry"]


def test_a_longer_time_limit_raises_the_default_visibility_timeout() -> None:
    s = Settings.from_env({"FANOUT_TASK_TIME_LIMIT": "100"})
    assert s.visibility_timeout == 215
    with pytest.raises(ConfigError):
        Settings.from_env({"FANOUT_TASK_TIME_LIMIT": "100", "FANOUT_VISIBILITY_TIMEOUT": "100"})


@pytest.mark.parametrize(("hard", "soft"), [(30, 20), (60, 50), (4, 2), (2, 1), (1, 1)])
def test_soft_limit(hard: int, soft: int) -> None:
    assert soft_limit(hard) == soft


def test_no_contact_sheet_when_not_asked_for(tmp_path: Path) -> None:
    record = {"source": "a", "destination": str(tmp_path / "a.png"), "width": 1, "height": 1, "bytes": 5}
    part: Part = {"start": 0, "results": [record], "errors": [], "transient": 0}
    written = write_report(str(tmp_path), merge([part], 1, "job", "resize"), sheet=False)
    assert written["contact_sheet"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
