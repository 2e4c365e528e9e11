"""Unit tests: the plain functions, with no broker."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
import redis
from PIL import Image

from orchestrator.inputs import parse_numbers, plan_images
from orchestrator.samples import make_photo
from workers import backend, storage
from workers.doubling import double
from workers.errors import ConfigError, ImageError, InputError, InvalidNumber, ItemError, TransientError
from workers.fanin import merge, run_batch
from workers.imaging import resize_image
from workers.paths import inside_url
from workers.resizing import ResizeOptions, render, resize_to
from workers.settings import DEFAULT_REDIS_URL, Settings

# --- doubling ---------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, -7, 2**100, -(2**200)])
def test_double_doubles_any_int_exactly(value: int) -> None:
    assert double(value) == value * 2


@pytest.mark.parametrize("value", ["3", 1.5, True, False, None, [1], {"a": 1}])
def test_double_rejects_what_is_not_an_int(value: object) -> None:
    with pytest.raises(InvalidNumber) as info:
        double(value)
    assert "expected an integer" in info.value.reason
    assert info.value.item == repr(value)


def test_item_errors_survive_a_round_trip_through_their_args() -> None:
    err = InvalidNumber("'x'", "expected an integer, got str")
    rebuilt = InvalidNumber(*err.args)
    assert str(rebuilt) == str(err) == "'x': expected an integer, got str"


# --- batches and the fan-in -------------------------------------------------


def test_run_batch_keeps_positions_and_reports_errors_by_index() -> None:
    part = run_batch(double, 10, [1, "x", 3])
    assert part["start"] == 10
    assert part["results"] == [2, None, 6]
    assert part["errors"] == [{"index": 11, "input": "x", "error": "expected an integer, got str"}]


def test_merge_restores_input_order_whatever_order_parts_arrive_in() -> None:
    parts = [run_batch(double, 4, [4, 5]), run_batch(double, 0, [0, 1]), run_batch(double, 2, [2, 3])]
    outcome = merge(parts, 6, "job", "double")
    assert outcome["results"] == [0, 2, 4, 6, 8, 10]
    assert (outcome["succeeded"], outcome["failed"], outcome["errors"]) == (6, 0, [])


def test_merge_counts_a_redelivered_batch_once() -> None:
    first = run_batch(double, 0, [1, 2])
    outcome = merge([first, run_batch(double, 2, [3]), first], 3, "job", "double")
    assert outcome["results"] == [2, 4, 6]
    assert outcome["total"] == outcome["succeeded"] == 3


def test_merge_keeps_the_first_report_of_an_index_when_two_runs_of_its_batch_disagree() -> None:
    # A batch run twice (redelivered) whose runs differ: the first report of each index wins,
    # in either order, and an index is never both a result and an error.
    done = run_batch(double, 0, [1, 2])
    failed = run_batch(double, 0, [1, "x"])  # index 1 failed on the other run
    outcome = merge([done, failed], 2, "job", "double")
    assert outcome["results"] == [2, 4]
    assert (outcome["succeeded"], outcome["failed"], outcome["errors"]) == (2, 0, [])
    outcome = merge([failed, done], 2, "job", "double")
    assert outcome["results"] == [2, None]
    assert (outcome["succeeded"], outcome["failed"]) == (1, 1)
    assert outcome["errors"] == [{"index": 1, "input": "x", "error": "expected an integer, got str"}]


def test_merge_reports_an_index_no_part_covered_as_lost() -> None:
    outcome = merge([run_batch(double, 0, [1]), None], 2, "job", "double")
    assert outcome["results"] == [2, None]
    assert outcome["failed"] == 1
    assert outcome["errors"][0]["index"] == 1
    assert "lost" in outcome["errors"][0]["error"]


# --- resizing ---------------------------------------------------------------


def test_resize_fits_within_max_side_keeping_aspect(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "in.jpg", (1000, 500))
    record = resize_image(src, tmp_path / "out" / "in.jpg", 200)
    assert (record["width"], record["height"]) == (200, 100)
    with Image.open(tmp_path / "out" / "in.jpg") as im:
        assert im.size == (200, 100) and im.format == "JPEG"
    assert record["bytes"] == (tmp_path / "out" / "in.jpg").stat().st_size


def test_resize_applies_exif_orientation(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "rot.jpg", (1000, 500), orientation=6)  # stored landscape, shown portrait
    record = resize_image(src, tmp_path / "rot-out.jpg", 200)
    assert (record["width"], record["height"]) == (100, 200)


def test_resize_keeps_png_and_does_not_enlarge(tmp_path: Path) -> None:
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(tmp_path / "small.png")
    record = resize_image(tmp_path / "small.png", tmp_path / "small-out.png", 256)
    assert (record["width"], record["height"]) == (40, 30)
    with Image.open(tmp_path / "small-out.png") as im:
        assert im.format == "PNG" and im.mode == "RGBA"


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_resize_names_the_file_it_cannot_read(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(ImageError) as info:
        resize_image(bad, tmp_path / "out.jpg", 100)
    assert info.value.item == str(bad)
    assert not (tmp_path / "out.jpg").exists()


def test_resize_reports_a_truncated_jpeg(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "whole.jpg", (600, 400))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(src.read_bytes()[:2000])
    with pytest.raises(ItemError, match=r"cut\.jpg"):
        resize_image(cut, tmp_path / "out.jpg", 100)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resize_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        resize_image(tmp_path / "nope.jpg", tmp_path / "out.jpg", 100)


# --- command-line input -----------------------------------------------------


def test_parse_numbers_accepts_signs_and_huge_values() -> None:
    assert parse_numbers(["1", "-2", "+3", str(2**100)]) == [1, -2, 3, 2**100]


@pytest.mark.parametrize("bad", ["1.5", "abc", "", "0x10", "1e3", "_1"])
def test_parse_numbers_names_the_bad_argument(bad: str) -> None:
    with pytest.raises(InputError, match=r"argument 2 \(" + repr(bad).replace("(", r"\(") + r"\)"):
        parse_numbers(["1", bad])


def test_plan_images_keeps_layout_skips_non_images_and_avoids_collisions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_photo(src / "a.jpg", (64, 48))
    make_photo(src / "sub" / "a.jpg", (64, 48))
    (src / "readme.txt").parent.mkdir(exist_ok=True)
    (src / "readme.txt").write_text("not an image")
    other = make_photo(tmp_path / "other" / "a.jpg", (64, 48))
    out = tmp_path / "out"
    plan = plan_images([src, other], out)
    assert plan.pairs == [
        (str(src / "a.jpg"), str(out / "a.jpg")),
        (str(src / "sub" / "a.jpg"), str(out / "sub" / "a.jpg")),
        (str(other), str(out / "a~2.jpg")),
    ]
    assert plan.skipped == [str(src / "readme.txt")]


def test_plan_images_never_walks_the_output_directory(tmp_path: Path) -> None:
    make_photo(tmp_path / "a.jpg", (64, 48))
    make_photo(tmp_path / "out" / "old.jpg", (64, 48))
    plan = plan_images([tmp_path], tmp_path / "out")
    assert [Path(s).name for s, _ in plan.pairs] == ["a.jpg"]


def test_plan_images_rejects_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        plan_images([tmp_path / "missing"], tmp_path / "out")


# --- settings ---------------------------------------------------------------


def test_settings_default_to_local_redis_for_both_roles() -> None:
    s = Settings.from_env({})
    assert s.broker_url == s.result_backend == DEFAULT_REDIS_URL
    assert s.visibility_timeout > s.task_time_limit


def test_settings_allow_separate_broker_and_backend() -> None:
    s = Settings.from_env(
        {"FANOUT_REDIS_URL": "redis://h:1/2", "FANOUT_RESULT_BACKEND": "rediss://:pw@r:6380/3"}
    )
    # A rediss:// URL without ssl_cert_reqs verifies the server (tests/test_connections.py).
    assert (s.broker_url, s.result_backend) == (
        "redis://h:1/2",
        "rediss://:pw@r:6380/3?ssl_cert_reqs=required",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FANOUT_REDIS_URL": "amqp://guest@localhost//"}, "expected a Redis URL"),
        ({"FANOUT_REDIS_URL": "redis://localhost:notaport/0"}, "not a valid URL"),
        ({"FANOUT_TASK_TIME_LIMIT": "ten"}, "not a whole number"),
        ({"FANOUT_TASK_TIME_LIMIT": "100", "FANOUT_VISIBILITY_TIMEOUT": "50"}, "must exceed"),
    ],
)
def test_settings_reject_bad_values_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_celery_config_is_json_only_with_late_acks() -> None:
    from workers.app import celery_config

    conf = celery_config(Settings.from_env({}))
    assert conf["accept_content"] == ["json"] and conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] is True
    assert conf["worker_send_task_events"] is True
    assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]


@pytest.mark.parametrize("url", ["unix:///run/redis.sock", "redis+socket:///run/redis.sock"])
def test_a_unix_socket_url_is_spelled_for_kombu_and_the_backend(url: str) -> None:
    from workers.app import celery_config

    conf = celery_config(Settings.from_env({"FANOUT_REDIS_URL": url}))
    assert conf["broker_url"] == "redis+socket:///run/redis.sock"
    assert conf["result_backend"].endswith("socket:///run/redis.sock")


def test_a_combined_part_counts_each_of_its_batches_once() -> None:
    from workers.fanin import fail_batch, merge

    first = {"start": 0, "results": [10, 20], "errors": [], "transient": 0}
    combined = {
        "start": 0,
        "results": [],
        "errors": [],
        "transient": 0,
        "parts": [fail_batch(2, ["c"], "cancelled"), fail_batch(3, ["d", "e"], "cancelled")],
    }
    outcome = merge([combined, first, first], 5, "job", "t")  # type: ignore[list-item]
    assert outcome["results"] == [10, 20, None, None, None]
    assert [(e["index"], e["error"]) for e in outcome["errors"]] == [
        (2, "cancelled"),
        (3, "cancelled"),
        (4, "cancelled"),
    ]


# --- I/O errors: transient (the batch is retried) or permanent (the item fails) ---------


class _FailingRead(io.BytesIO):
    """A source whose bytes stop coming with ``error`` after the first ``good`` bytes."""

    def __init__(self, data: bytes, good: int, error: BaseException) -> None:
        super().__init__(data)
        self.good, self.error = good, error

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.good:
            raise self.error
        return super().read(size if size is None or size < 0 else min(size, self.good - self.tell()))


class _NoCredentialsError(Exception):
    """Shaped like botocore's: a store that refuses us will refuse us again."""


TRANSIENT = [
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    OSError(errno.ESTALE, "Stale file handle"),
    OSError(errno.EAGAIN, "Resource temporarily unavailable"),
    OSError(errno.ENOSPC, "No space left on device"),
    TimeoutError("timed out"),  # a socket timeout: no errno
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),  # as a real socket raises it
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    RuntimeError("503 Slow Down"),  # a store's server-side error
]
PERMANENT = [
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "no such file"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), "is a directory"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only"),
    (ValueError("bad bucket name"), "bad bucket name"),
    (_NoCredentialsError("Unable to locate credentials"), "credentials"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=repr)
def test_a_read_or_write_that_may_pass_again_is_transient(
    error: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_photo(tmp_path / "in.jpg", (300, 200))

    def fail(*_: object) -> object:
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(storage, "open_source", fail)
        with pytest.raises(TransientError, match=r"in\.jpg"):
            resize_to(str(src), str(tmp_path / "out.jpg"), (100, 100), ResizeOptions())
    with monkeypatch.context() as patch:
        patch.setattr(storage, "write_atomic", fail)
        with pytest.raises(TransientError, match=r"in\.jpg"):
            resize_to(str(src), str(tmp_path / "out.jpg"), (100, 100), ResizeOptions())


@pytest.mark.parametrize(("error", "reason"), PERMANENT, ids=lambda e: repr(e))
def test_a_read_or_write_that_cannot_pass_fails_the_item_by_name(
    error: BaseException, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_photo(tmp_path / "in.jpg", (300, 200))

    def fail(*_: object) -> object:
        raise error

    for target in ("open_source", "write_atomic"):
        with monkeypatch.context() as patch:
            patch.setattr(storage, target, fail)
            with pytest.raises(ImageError) as info:
                resize_to(str(src), str(tmp_path / "out.jpg"), (100, 100), ResizeOptions())
        assert info.value.item == str(src), target
        assert reason.lower() in info.value.reason.lower(), (target, info.value.reason)


def test_an_io_error_while_decoding_is_transient_and_a_damaged_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_photo(tmp_path / "in.jpg", (600, 400))
    data = src.read_bytes()
    flaky = _FailingRead(data, len(data) // 2, OSError(errno.EIO, "Input/output error"))
    monkeypatch.setattr(storage, "open_source", lambda _url: flaky)
    with pytest.raises(TransientError):
        resize_to(str(src), str(tmp_path / "out.jpg"), (100, 100), ResizeOptions())
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])  # the same bytes, but that is all there is
    monkeypatch.undo()
    with pytest.raises(ImageError):
        resize_to(str(cut), str(tmp_path / "out.jpg"), (100, 100), ResizeOptions())


def test_a_batch_counts_its_transient_errors_so_the_task_can_retry_it() -> None:
    def work(value: int) -> int:
        if value == 2:
            raise TransientError("s3://b/2.jpg: cannot read: ReadTimeoutError")
        if value == 3:
            raise ImageError("s3://b/3.jpg", "not an image Pillow can identify")
        return value

    part = run_batch(work, 0, [1, 2, 3])
    assert part["transient"] == 1
    assert [e["index"] for e in part["errors"]] == [1, 2]


# --- retrying Redis through a restart ------------------------------------------------


class _Clock:
    """A stand-in for the ``time`` module: sleeping advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def test_retrying_gives_up_once_its_time_is_spent_and_raises_the_last_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(backend, "time", clock)
    calls = []

    def down() -> None:
        calls.append(clock.now)
        raise redis.ConnectionError(f"refused #{len(calls)}")

    with pytest.raises(redis.ConnectionError, match="refused #8"):
        backend.retrying(down, "a test", retry_for=10.0)
    # Backing off 0.2 s, doubling, capped at 2 s (9 s in all); the next pause would end past
    # the deadline, so the eighth failure is raised.
    assert clock.pauses == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert len(calls) == 8
    assert clock.now - 1000.0 <= 10.0


def test_retrying_returns_once_redis_answers_and_does_not_retry_a_real_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _Clock()
    monkeypatch.setattr(backend, "time", clock)
    answers: list[BaseException | int] = [redis.ConnectionError("down"), redis.BusyLoadingError("loading"), 7]

    def flaky() -> int:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert backend.retrying(flaky, "a test") == 7
    assert clock.pauses == [0.2, 0.4]

    def wrong() -> None:
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(redis.ResponseError):
        backend.retrying(wrong, "a test")
    assert clock.pauses == [0.2, 0.4], "an error that is not an outage is raised at once"


# --- outputs stay under --out in an object store --------------------------------------


@pytest.mark.parametrize(
    "destination",
    [
        "s3://bucket/out/../secret.jpg",
        "s3://bucket/out/sub/../../x.jpg",
        "s3://bucket/out/./x.jpg",
        "s3://bucket/out//x.jpg",
        "s3://bucket/out/..",
        "s3://bucket/out/",
        "s3://bucket/outside/x.jpg",
        "s3://bucket/out-2/x.jpg",  # shares the prefix's letters, not the prefix
        "s3://other/out/x.jpg",
        "/tmp/out/x.jpg",
    ],
)
def test_an_object_key_outside_the_output_prefix_is_refused(destination: str) -> None:
    with pytest.raises(ImageError) as info:
        inside_url(destination, "s3://bucket/out", "photo.jpg")
    assert info.value.item == "photo.jpg" and "outside" in info.value.reason


@pytest.mark.parametrize("root", ["s3://bucket/out", "s3://bucket/out/"])
def test_an_object_key_under_the_output_prefix_is_kept(root: str) -> None:
    for key in ("s3://bucket/out/x.jpg", "s3://bucket/out/a/b/x..jpg", "s3://bucket/out/.x/y.jpg"):
        assert inside_url(key, root, "photo.jpg") == key


def test_a_local_root_refuses_an_object_store_destination(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not under the output directory"):
        inside_url("s3://bucket/x.jpg", str(tmp_path), "photo.jpg")


# --- JPEG draft decoding ------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "decoded"),
    [
        (256, (480, 270)),  # the README's example: 1/4 scale, not 1/2 (960 px)
        (480, (480, 270)),  # exactly the box: still 1/4
        (481, (960, 540)),  # one pixel more: 1/2
        (200, (240, 135)),  # 1/8, the smallest DCT scale
        (1000, (1920, 1080)),  # 1/2 would be too small: decoded whole
    ],
)
def test_jpeg_is_decoded_at_the_smallest_dct_scale_still_at_least_the_box(
    tmp_path: Path, box: int, decoded: tuple[int, int]
) -> None:
    src = make_photo(tmp_path / "photo.jpg", (1920, 1080))
    with Image.open(src) as im:
        out = render(im, (box, box), ResizeOptions())
        assert im.size == decoded  # draft() set the size the decoder produced
    assert out.size == (box, round(box * 1080 / 1920))


def test_resize_retries_a_transient_error_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real task's policy: a transient I/O error retries the item, 1, 2 and 4 s apart, and the
    # error reported after the last attempt is that attempt's.
    import time

    from workers import tasks
    from workers.errors import TransientError
    from workers.resizing import ResizeOptions

    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    attempts: list[str] = []

    def flaky(
        source: str, destination: str, box: tuple[int, int], options: object, seen: object = None
    ) -> dict[str, object]:
        attempts.append(source)
        if len(attempts) < 3:
            raise TransientError(f"{source}: connection reset (attempt {len(attempts)})")
        return {"source": source, "destination": destination, "width": box[0], "height": box[1]}

    monkeypatch.setattr(tasks, "resize_to", flaky)
    options = {"options": ResizeOptions().to_json()}
    record = tasks.resize_items.run_item(["s3://in/a.jpg", "s3://out/a.jpg", 64, 64], options)
    assert record["source"] == "s3://in/a.jpg" and len(attempts) == 3 and pauses == [1.0, 2.0]

    def never(
        source: str, destination: str, box: object, options: object, seen: object = None
    ) -> dict[str, object]:
        attempts.append(source)
        raise TransientError(f"{source}: connection reset (attempt {len(attempts)})")

    attempts.clear()
    pauses.clear()
    monkeypatch.setattr(tasks, "resize_to", never)
    with pytest.raises(TransientError, match=r"attempt 4\)"):
        tasks.resize_items.run_item(["s3://in/b.jpg", "s3://out/b.jpg", 64, 64], options)
    assert pauses == [1.0, 2.0, 4.0]
