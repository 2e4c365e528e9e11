"""Hostile and broken input: bad image files, escaping paths, bad numbers and raw messages to the workers."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from PIL import Image

from orchestrator import builtin
from orchestrator.follow import wait
from orchestrator.inputs import plan_images
from orchestrator.local import LocalWorker
from orchestrator.samples import make_photo
from orchestrator.send import publish
from tests.corpus import broken, unusual
from workers.errors import ImageError
from workers.imaging import resize_image
from workers.paths import inside

# --- image files (no broker) --------------------------------------------------

REASONS = {
    "zero-byte": "not an image",
    "text-as-jpeg": "not an image",
    "truncated-jpeg": "truncated",
    "truncated-png": "truncated",
    "bomb-warning": "decompression bomb",
    "huge-declared": "decompression bomb",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_a_broken_file_is_an_error_naming_the_file_and_the_reason(tmp_path: Path, name: str) -> None:
    source = broken(tmp_path / "in")[name]
    with pytest.raises(ImageError) as info:
        resize_image(source, tmp_path / "out" / source.name, 100)
    assert info.value.item == str(source)
    assert REASONS[name] in info.value.reason
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == [], "no output, not even a temporary file, may be left behind"


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("cmyk-jpeg", "CMYK"),
        ("16-bit-png", "I;16"),
        ("palette-transparent-png", "RGBA"),  # resampled in full colour, transparency kept as alpha
        ("animated-gif", "P"),
        ("broken-exif", "RGB"),
    ],
)
def test_an_unusual_file_is_resized_in_its_own_mode(tmp_path: Path, name: str, mode: str) -> None:
    source = unusual(tmp_path / "in")[name]
    record = resize_image(source, tmp_path / "out" / source.name, 100)
    assert (record["width"], record["height"]) == (100, 50)
    with Image.open(record["destination"]) as im:
        assert im.size == (100, 50) and im.mode == mode
        if name == "palette-transparent-png":
            assert "A" in im.getbands(), "the palette's transparency is kept as an alpha channel"
        if name == "animated-gif":
            assert getattr(im, "n_frames", 1) == 1  # the first frame only, as documented


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_rotated_dimensions(tmp_path: Path, orientation: int) -> None:
    source = unusual(tmp_path / "in")[f"orientation-{orientation}"]
    record = resize_image(source, tmp_path / "out.jpg", 100)
    # 400x200 stored; orientations 5-8 turn it a quarter, so it shows as 200x400.
    expected = (50, 100) if orientation >= 5 else (100, 50)
    assert (record["width"], record["height"]) == expected
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.size == expected


# --- paths (no broker) --------------------------------------------------------


def test_an_output_name_cannot_escape_the_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    assert inside(out / "sub" / "a.jpg", out, "a") == out.resolve() / "sub" / "a.jpg"
    assert inside("sub/a.jpg", out, "a") == out.resolve() / "sub" / "a.jpg"
    for escaping in (out / ".." / "a.jpg", "../a.jpg", "/etc/a.jpg", out / "link" / "a.jpg", out / ".."):
        with pytest.raises(ImageError) as info:
            inside(escaping, out, "a")
        assert info.value.item == "a"


def test_an_existing_symlink_at_the_output_name_is_replaced_not_followed(tmp_path: Path) -> None:
    out, target = tmp_path / "out", tmp_path / "precious.jpg"
    out.mkdir()
    target.write_bytes(b"keep me")
    (out / "a.jpg").symlink_to(target)
    source = make_photo(tmp_path / "a.jpg", (300, 200))
    resize_image(source, inside(out / "a.jpg", out, "a"), 100)
    assert target.read_bytes() == b"keep me"
    assert not (out / "a.jpg").is_symlink()


def test_two_inputs_with_the_same_name_do_not_overwrite_each_other(tmp_path: Path) -> None:
    first = make_photo(tmp_path / "x" / "photo.jpg", (300, 200), seed=1)
    second = make_photo(tmp_path / "y" / "photo.jpg", (300, 200), seed=2)
    plan = plan_images([first, second], tmp_path / "out")
    destinations = [dst for _, dst in plan.pairs]
    assert len(set(destinations)) == 2
    assert all(Path(d).parent == (tmp_path / "out").resolve() for d in destinations)


# --- through the real worker --------------------------------------------------


@pytest.mark.system
def test_the_whole_corpus_through_a_worker_leaves_it_alive_and_every_file_accounted_for(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    bad = broken(tmp_path / "in" / "bad")
    odd = unusual(tmp_path / "in" / "odd")
    out = tmp_path / "out"
    plan = plan_images([tmp_path / "in"], out)
    job = publish(app, builtin.resize(plan.pairs, 100, str(out)), 3)
    outcome = wait(app, job, timeout=90)
    assert outcome["total"] == len(bad) + len(odd)
    failed = {e["input"]: e["error"] for e in outcome["errors"]}
    assert set(failed) == {str(p.resolve()) for p in bad.values()}
    for record in filter(None, outcome["results"]):
        with Image.open(record["destination"]) as im:
            assert im.size == (record["width"], record["height"]) and max(im.size) == 100
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["index"] for i in manifest["items"]] == list(range(outcome["total"]))
    assert app.control.ping([worker.hostname], timeout=2), "the worker should still answer"


@pytest.mark.system
def test_destinations_outside_the_output_directory_are_refused_by_the_worker(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    source = str(make_photo(tmp_path / "in.jpg", (300, 200)))
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    pairs = [
        (source, str(out / "ok.jpg")),
        (source, str(out / ".." / "escaped.jpg")),
        (source, "/tmp/fanout-escaped-" + uuid.uuid4().hex + ".jpg"),
        (source, str(out / "link" / "escaped.jpg")),
    ]
    job = publish(app, builtin.resize(pairs, 100, str(out)), 4)
    outcome = wait(app, job, timeout=60)
    assert outcome["results"][0] is not None and outcome["failed"] == 3
    assert all("outside the output directory" in e["error"] for e in outcome["errors"])
    assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path / "elsewhere" / "escaped.jpg").exists()
    assert not Path(pairs[2][1]).exists()


@pytest.mark.system
@pytest.mark.parametrize(
    ("value", "expected"),
    [(2**300, 2**301), (-(10**40), -2 * 10**40), ("7", None), (1.5, None), (True, None), (None, None)],
)
def test_numbers_sent_straight_to_the_task_are_doubled_or_per_item_errors(
    app: Celery, worker: LocalWorker, value: Any, expected: int | None
) -> None:
    result = app.send_task("fanout.double", args=[value])
    outcome = result.get(timeout=30, propagate=False)
    if expected is None:
        assert result.state == "FAILURE"
        assert "expected an integer" in str(outcome)
    else:
        assert result.state == "SUCCESS" and outcome == expected


def _publish_raw(app: Celery, body: Any, serializer: str | None = None, **extra: Any) -> str:
    """Publish one task message for ``fanout.double`` by hand, as a hostile client could."""
    from kombu.entity import Exchange
    from kombu.messaging import Producer

    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "fanout.double", "id": task_id, "root_id": task_id, "retries": 0}
    with app.connection_for_write() as conn:
        producer = Producer(conn)  # type: ignore[no-untyped-call]
        producer.publish(  # type: ignore[no-untyped-call]
            body,
            exchange=Exchange(app.conf.task_default_queue, type="direct"),  # type: ignore[no-untyped-call]
            routing_key=app.conf.task_default_queue,
            serializer=serializer,
            headers=headers,
            **extra,
        )
    return task_id


class _Plant:
    """Unpickling this creates a file: proof that a worker ran what a pickle said."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.system
def test_a_pickle_message_is_refused_and_the_worker_lives_on(
    app: Celery, worker: LocalWorker, tmp_path: Path
) -> None:
    planted = tmp_path / "planted"
    _publish_raw(app, ([_Plant(str(planted))], {}, {}), serializer="pickle")
    # A JSON message whose number Python's json module refuses to read (over 4300 digits).
    _publish_raw(
        app,
        "[[" + "9" * 5000 + "], {}, {}]",
        content_type="application/json",
        content_encoding="utf-8",
    )
    # Messages are taken in order: once a later one is done, the hostile ones were handled.
    assert app.send_task("fanout.double", args=[21]).get(timeout=30) == 42
    assert not planted.exists(), "the worker unpickled a message"
    assert app.backend.client.llen(app.conf.task_default_queue) == 0, (
        "the hostile messages should have been taken and dropped"
    )
    assert worker.process is not None and worker.process.poll() is None
    assert app.control.ping([worker.hostname], timeout=2)
