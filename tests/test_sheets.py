"""The contact sheet drawn while the job runs: counting per page in real Redis, pages kept or redrawn."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from orchestrator.inputs import plan_images
from orchestrator.local import LocalWorker
from tests.conftest import marked_cells
from tests.faultkit import deliver_first_batch_twice, log_of, new_queue, resize_job, send
from workers import contact_sheet, sheets
from workers.contact_sheet import CELL, GAP, MARKER, cell_origin, make_tile
from workers.fanin import merge
from workers.report import MANIFEST, write_report

RED, BLUE = (220, 30, 30), (30, 60, 220)
GREEN = (40, 200, 40)
#: 20 images in pages of two rows: columns_for(20) == 6, so 12 images on page 0 and 8 on page 1.
IMAGES = 20
SIZES = (12, 8)


@pytest.fixture(autouse=True)
def _two_rows_a_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contact_sheet, "PAGE_MAX", 2 * (CELL + GAP) + GAP)


def close(pixel: Any, expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, expected, strict=False))


class Job:
    """A resize job as its header tasks run it: a green output and tile per image that succeeded."""

    def __init__(self, root: Path, failed: set[int], untiled: frozenset[int] = frozenset()) -> None:
        self.out = str(root / "out")
        self.tiles = sheets.tiles_dir(self.out, "job-1")
        self.failed = failed
        self.made: dict[int, Image.Image] = {}  # ``untiled``: succeeded, but its tile could not be made
        self.results: list[Any] = []
        for i in range(IMAGES):
            if i in failed:
                self.results.append(None)
                continue
            destination = root / "out" / f"{i}.jpg"
            Path(self.out).mkdir(exist_ok=True)
            Image.new("RGB", (256, 144), GREEN).save(destination)
            if i not in untiled:
                self.made[i] = make_tile(Image.new("RGB", (256, 144), GREEN))
            self.results.append(
                {"source": f"/in/{i}.jpg", "destination": str(destination), "box": [256, 256], "width": 256,
                 "height": 144, "format": "JPEG", "bytes": 1, "seconds": 0.01}
            )  # fmt: skip
        self.sheet = {"images": IMAGES, "tiles": self.tiles}
        self.group = str(uuid.uuid4())  # the chord's group id: the Redis keys are the job's own

    def batch(self, client: redis.Redis, start: int, size: int) -> list[int]:
        """What a header task does after its batch of images ``start`` .. ``start + size - 1``."""
        images = range(start, min(start + size, IMAGES))
        items = [[f"/in/{i}.jpg", f"{i}.jpg", 256, 256, i] for i in images]
        made = {i: tile for i, tile in self.made.items() if i in images}
        return sheets.batch_done(client, self.group, start, items, made, self.sheet, self.out, 600)

    def report(self) -> dict[str, Any]:
        errors = [
            {"index": i, "input": f"/in/{i}.jpg", "error": "corrupt image"} for i in sorted(self.failed)
        ]
        part = {"start": 0, "results": self.results, "errors": errors, "transient": 0}
        outcome = merge([part], IMAGES, "job-1", "resize")  # type: ignore[list-item]
        return write_report(self.out, outcome, 1, True, self.tiles)

    def page(self, number: int) -> Path:
        return Path(self.out) / f"contact-sheet-{number + 1}.jpg"


def test_each_page_is_drawn_by_the_batch_that_completes_it_and_a_batch_run_twice_counts_once(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    job = Job(tmp_path, failed={3})
    assert job.batch(redis_client, 0, 8) == []
    assert not job.page(0).exists()
    assert job.batch(redis_client, 0, 8) == []  # redelivered: not counted again
    assert job.batch(redis_client, 16, 8) == []  # images 16-19, page 1
    assert job.batch(redis_client, 8, 8) == [0, 1]  # completes both pages (images 8-11 and 12-15)
    assert job.batch(redis_client, 8, 8) == []  # run twice: no page drawn twice
    assert job.page(0).exists() and job.page(1).exists()
    strips = sorted(p.name for p in Path(job.tiles).glob("*.jpg"))
    assert strips == ["0-8-f7.jpg", "16-4-f.jpg", "8-8-ff.jpg"]  # one a batch; image 3 has no tile
    note = json.loads(Path(sheets.note_of(job.tiles, 0)).read_text())
    assert note == {"name": "contact-sheet-1.jpg", "missing": [3]}
    with Image.open(job.page(0)) as page:
        assert page.format == "JPEG"
        x, y = cell_origin(3, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), MARKER)
        x, y = cell_origin(4, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), GREEN)


def test_the_fan_in_keeps_the_pages_drawn_early_and_cleans_up(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    job = Job(tmp_path, failed={3, 13})
    for start in (0, 8, 16):
        job.batch(redis_client, start, 8)
    drawn = [job.page(n).stat().st_mtime_ns for n in (0, 1)]
    written = job.report()
    assert [job.page(n).stat().st_mtime_ns for n in (0, 1)] == drawn  # kept, not drawn again
    assert [Path(u).name for u in written["contact_sheets"]] == ["contact-sheet-1.jpg", "contact-sheet-2.jpg"]
    assert json.loads((Path(job.out) / MANIFEST).read_text())["contact_sheets"] == [
        "contact-sheet-1.jpg", "contact-sheet-2.jpg",
    ]  # fmt: skip
    assert not (Path(job.out) / sheets.TILES_DIR).exists()  # strips and notes gone


def test_a_page_drawn_with_a_tile_missing_for_an_image_that_succeeded_is_drawn_again(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    job = Job(tmp_path, failed=set(), untiled=frozenset({5}))  # no tile; the output is there
    job.batch(redis_client, 0, 20)
    with Image.open(job.page(0)) as page:
        x, y = cell_origin(5, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), MARKER)  # drawn early as missing
    job.report()
    with Image.open(job.page(0)) as page:
        x, y = cell_origin(5, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), GREEN)  # the output, read back


def test_a_page_never_completed_is_drawn_at_the_fan_in(redis_client: redis.Redis, tmp_path: Path) -> None:
    job = Job(tmp_path, failed={19})
    job.batch(redis_client, 0, 12)  # page 0 only; page 1's batches never reported (lost, killed mid-draw)
    assert job.page(0).exists() and not job.page(1).exists()
    job.report()
    with Image.open(job.page(1)) as page:
        x, y = cell_origin(7, 6)  # image 19
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), MARKER)
        x, y = cell_origin(0, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), GREEN)


@pytest.mark.system
def test_a_resize_whose_first_batch_runs_twice_draws_its_page_once_as_it_runs_and_keeps_it(
    app: Any, start_worker: Callable[..., LocalWorker], photos: Path, tmp_path: Path
) -> None:
    (photos / "p6-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    queue = new_queue()
    out = tmp_path / "out"
    pairs = plan_images([photos], out).pairs
    sent = send(app, resize_job(pairs, 64, out, batch_size=2, queue=queue))
    deliver_first_batch_twice(app, queue)
    worker = start_worker(app, queue, "sheet")
    outcome = sent.wait(timeout=60)
    assert (outcome["total"], outcome["failed"]) == (7, 1)
    log = log_of(worker)
    first = log.split("Task fanout.resize_items[", 1)[1].split("]", 1)[0]  # the copy, taken first
    assert log.count(f"{first}] succeeded") == 2, "the copy of the first batch should have run too"
    # Counted twice, the page's count would pass 7 without ever equalling it: drawn at the fan-in.
    assert log.count("drew contact-sheet page contact-sheet.jpg") == 1
    assert "kept 1 of 1 contact-sheet pages drawn as the job ran" in log
    assert marked_cells(out / "contact-sheet.jpg", 7) == [6]  # the broken image's cell, and no other
    assert json.loads((out / MANIFEST).read_text())["contact_sheets"] == ["contact-sheet.jpg"]
    assert not (out / sheets.TILES_DIR).exists()
