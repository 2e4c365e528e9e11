"""What a person sees: output sized for a terminal, and progress that never goes backwards."""

from __future__ import annotations

import io
import os
import pty
import subprocess
from collections.abc import Generator
from typing import Any

import pytest

from orchestrator import follow, render
from orchestrator.local import LocalWorker
from tests.conftest import fanout_command
from workers.fanin import OutcomeDoc


def test_head_passes_the_first_lines_and_counts_the_rest() -> None:
    out = io.StringIO()
    head = render.Head(out, 3)
    head.write("a\nb\n")
    head.writelines(["c\n", "d\n", "e\n"])
    assert out.getvalue() == "a\nb\nc\n"
    assert head.held_back == 2


class Job:
    job_id, group_id, total, batch_size, batches = "job", "group", 30, 10, 3


def test_progress_only_grows_and_a_vanished_join_reads_as_the_fan_in(monkeypatch: pytest.MonkeyPatch) -> None:
    # The chord deletes its join when the callback is sent: the count of finished batches reads 0.
    outcome: OutcomeDoc = {
        "job_id": "job", "task": "t", "total": 30, "succeeded": 30, "failed": 0, "results": [], "errors": []
    }  # fmt: skip

    def polls(*args: Any) -> Generator[int, None, OutcomeDoc]:
        yield from (0, 1, 2, 0, 0)
        return outcome

    monkeypatch.setattr(follow, "follow", polls)
    seen: list[tuple[int, int]] = []
    assert follow.wait(None, Job(), 10, lambda done, batches: seen.append((done, batches))) is outcome  # type: ignore[arg-type]
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3), (3, 3)]


@pytest.mark.system
def test_a_terminal_gets_the_first_lines_and_a_summary(cli_env: dict[str, str], worker: LocalWorker) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            fanout_command("double", "--range", "100", "--no-progress"),
            env=cli_env,
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the pty's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0, proc.stderr
    lines = shown.decode().replace("\r\n", "\n").splitlines()
    assert lines[:10] == [str(2 * i) for i in range(10)]
    assert lines[10] == "... and 90 more lines: redirect stdout, or use --json, for them all"
    assert len(lines) == 11
    assert "double: 100 items, 100 succeeded" in proc.stderr
