"""Resize options, storage and the fan-in's report: each checks the output's pixels or dimensions.

No broker: these call the plain functions the tasks wrap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import pytest
from PIL import Image, ImageCms, PngImagePlugin

from orchestrator import builtin
from orchestrator.canvas import build
from orchestrator.inputs import mean_bytes, parse_size, plan_images, plan_outputs
from orchestrator.samples import make_photo
from workers import contact_sheet, sheets, storage
from workers.contact_sheet import CELL, GAP, MARKER, PAGE_MAX, cell_origin, compose, pages
from workers.errors import ImageError, InputError
from workers.fanin import OutcomeDoc, merge
from workers.report import CONTACT_SHEET, MANIFEST, images, write_report
from workers.resizing import ResizeOptions, output_size, render, resize_to

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def close(pixel: object, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    assert isinstance(pixel, tuple)
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, expected, strict=False))


def stripes(path: Path, size: tuple[int, int] = (600, 200)) -> Path:
    """Three vertical stripes, red | green | blue, as a PNG (lossless, so colours are exact)."""
    width, height = size
    im = Image.new("RGB", size, GREEN)
    im.paste(RED, (0, 0, width // 3, height))
    im.paste(BLUE, (2 * width // 3, 0, width, height))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def resize(src: Path, dst: Path, box: tuple[int, int], **options: object) -> Image.Image:
    record = resize_to(str(src), str(dst), box, ResizeOptions(**options))  # type: ignore[arg-type]
    im = Image.open(dst)
    im.load()
    assert (record["width"], record["height"]) == im.size
    assert record["bytes"] == dst.stat().st_size
    return im


# --- sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "box", "mode", "upscale", "expected"),
    [
        ((1000, 500), (200, 200), "fit", False, (200, 100)),
        ((1000, 500), (300, 100), "fit", False, (200, 100)),
        ((100, 50), (400, 400), "fit", False, (100, 50)),
        ((100, 50), (400, 400), "fit", True, (400, 200)),
        ((1000, 500), (200, 200), "fill", False, (200, 200)),
        ((100, 50), (400, 200), "fill", False, (100, 50)),
        ((100, 50), (200, 200), "fill", False, (50, 50)),
        ((100, 50), (200, 200), "fill", True, (200, 200)),
        ((1000, 500), (300, 300), "exact", False, (300, 300)),
        ((100, 50), (300, 30), "exact", False, (100, 30)),
        ((100, 50), (300, 300), "exact", True, (300, 300)),
    ],
)
def test_output_size(
    size: tuple[int, int], box: tuple[int, int], mode: str, upscale: bool, expected: tuple[int, int]
) -> None:
    assert output_size(size, box, mode, upscale) == expected


def test_fit_keeps_the_aspect_within_the_box(tmp_path: Path) -> None:
    im = resize(stripes(tmp_path / "s.png"), tmp_path / "o.png", (150, 150))
    assert im.size == (150, 50)
    assert close(im.getpixel((10, 25)), RED) and close(im.getpixel((140, 25)), BLUE)


@pytest.mark.parametrize(
    ("anchor", "colour"), [("center", GREEN), ("left", RED), ("right", BLUE), ("top-left", RED)]
)
def test_fill_crops_to_the_exact_box_around_the_anchor(
    tmp_path: Path, anchor: str, colour: tuple[int, int, int]
) -> None:
    im = resize(stripes(tmp_path / "s.png"), tmp_path / "o.png", (100, 100), mode="fill", anchor=anchor)
    assert im.size == (100, 100)
    # The kept square is one whole stripe: every corner has its colour.
    for xy in ((2, 2), (97, 2), (2, 97), (97, 97), (50, 50)):
        assert close(im.getpixel(xy), colour), (xy, im.getpixel(xy))


def test_exact_stretches_to_the_box(tmp_path: Path) -> None:
    im = resize(stripes(tmp_path / "s.png"), tmp_path / "o.png", (90, 300), mode="exact", upscale=True)
    assert im.size == (90, 300)
    assert close(im.getpixel((5, 150)), RED)
    assert close(im.getpixel((45, 150)), GREEN)
    assert close(im.getpixel((85, 150)), BLUE)


def test_a_small_image_is_kept_at_its_size_unless_upscale(tmp_path: Path) -> None:
    src = stripes(tmp_path / "s.png", (60, 20))
    assert resize(src, tmp_path / "a.png", (600, 600)).size == (60, 20)
    assert resize(src, tmp_path / "b.png", (600, 600), upscale=True).size == (600, 200)
    # fill without upscale: the box's shape at the image's own scale, cut from the middle.
    im = resize(src, tmp_path / "c.png", (600, 600), mode="fill")
    assert im.size == (20, 20) and close(im.getpixel((10, 10)), GREEN)


def test_exif_orientation_is_applied_before_the_box(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "rot.jpg", (1000, 500), orientation=6)  # shown as 500x1000
    assert resize(src, tmp_path / "fit.jpg", (200, 200)).size == (100, 200)
    assert resize(src, tmp_path / "fill.jpg", (300, 100), mode="fill").size == (300, 100)


# --- formats and metadata -------------------------------------------------------


def test_alpha_is_flattened_onto_the_background_for_jpeg(tmp_path: Path) -> None:
    im = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # transparent left half
    im.paste((255, 0, 0, 255), (50, 0, 100, 100))  # opaque red right half
    im.save(tmp_path / "a.png")
    white = resize(tmp_path / "a.png", tmp_path / "w.jpg", (100, 100), format="jpeg")
    assert white.format == "JPEG" and white.mode == "RGB"
    assert close(white.getpixel((10, 50)), (255, 255, 255)) and close(white.getpixel((90, 50)), RED)
    black = resize(tmp_path / "a.png", tmp_path / "b.jpg", (100, 100), format="jpeg", background="black")
    assert close(black.getpixel((10, 50)), (0, 0, 0))


def test_webp_keeps_alpha_and_quality_changes_the_bytes(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "p.jpg", (800, 600))
    low = resize(src, tmp_path / "low.webp", (400, 400), format="webp", quality=10)
    high = resize(src, tmp_path / "high.webp", (400, 400), format="webp", quality=95)
    assert low.format == high.format == "WEBP" and low.size == (400, 300)
    assert (tmp_path / "low.webp").stat().st_size < (tmp_path / "high.webp").stat().st_size
    Image.new("RGBA", (40, 40), (0, 0, 255, 100)).save(tmp_path / "t.png")
    alpha = resize(tmp_path / "t.png", tmp_path / "t.webp", (20, 20), format="webp")
    assert alpha.mode == "RGBA" and abs(alpha.getpixel((10, 10))[3] - 100) <= 2  # type: ignore[index]


def test_png_output_and_keep(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "p.jpg", (800, 600))
    assert resize(src, tmp_path / "p.png", (80, 80), format="png").format == "PNG"
    assert resize(src, tmp_path / "k.jpg", (80, 80), format="keep").format == "JPEG"


def test_the_icc_profile_is_kept_and_other_metadata_dropped(tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"  # Make
    exif[0x8298] = "Someone"  # Copyright
    Image.new("RGB", (400, 300), (10, 120, 200)).save(tmp_path / "m.jpg", icc_profile=icc, exif=exif)
    for fmt, name in (("keep", "o.jpg"), ("png", "o.png"), ("webp", "o.webp")):
        out = resize(tmp_path / "m.jpg", tmp_path / name, (100, 100), format=fmt)
        assert out.info.get("icc_profile") == icc, fmt
        assert dict(out.getexif()) == {}, fmt
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "private")
    Image.new("RGB", (40, 40)).save(tmp_path / "t.png", pnginfo=text)
    assert "Comment" not in resize(tmp_path / "t.png", tmp_path / "t-out.png", (20, 20)).info


# --- speed and safety ------------------------------------------------------------


def test_jpeg_is_decoded_at_reduced_scale_for_a_small_box(tmp_path: Path) -> None:
    src = make_photo(tmp_path / "big.jpg", (4000, 3000))
    with Image.open(src) as im:
        out = render(im, (100, 100), ResizeOptions())
        decoded = im.size  # draft() changed the size the decoder produced
    assert out.size == (100, 75)
    assert decoded == (500, 375)  # 1/8 scale: still at least twice the target, as thumbnail() does


def test_the_decompression_bomb_limit_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_photo(tmp_path / "p.jpg", (800, 600))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800 * 600 // 4)
    with pytest.raises(ImageError, match="decompression bomb"):
        resize_to(str(src), str(tmp_path / "o.jpg"), (100, 100), ResizeOptions())
    assert not (tmp_path / "o.jpg").exists()


def test_bad_options_are_refused() -> None:
    for bad in (
        {"mode": "crop"},
        {"anchor": "middle"},
        {"format": "gif"},
        {"quality": 0},
        {"background": "#zz"},
    ):
        with pytest.raises(InputError):
            ResizeOptions(**bad)
    assert ResizeOptions.from_json(ResizeOptions(mode="fill").to_json()) == ResizeOptions(mode="fill")


# --- storage ----------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "d" / "out.bin"
    assert storage.write_atomic(str(target), lambda fh: fh.write(b"first")) == 5

    def half_then_fail(fh: IO[bytes]) -> None:
        fh.write(b"half-written")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        storage.write_atomic(str(target), half_then_fail)
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # readable as a plain open() would make it


def test_file_urls_and_relative_paths_become_absolute_paths(tmp_path: Path) -> None:
    assert storage.normalize(f"file://{tmp_path}/a b.jpg") == str(tmp_path / "a b.jpg")
    assert storage.normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert storage.join("s3://bucket/out", "sub/a.jpg") == "s3://bucket/out/sub/a.jpg"
    assert storage.relative_to("s3://b/in/sub/a.jpg", "s3://b/in") == "sub/a.jpg"


# --- planning ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "box"), [("256", (256, 256)), ("800x600", (800, 600)), (" 64X32 ", (64, 32))]
)
def test_parse_size(text: str, box: tuple[int, int]) -> None:
    assert parse_size(text) == box


@pytest.mark.parametrize("bad", ["", "0", "x", "10x", "1.5", "10x10x10", "-3"])
def test_parse_size_refuses(bad: str) -> None:
    with pytest.raises(InputError):
        parse_size(bad)


def test_several_sizes_and_a_format_give_names_that_do_not_collide(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out"
    plan = plan_images([f"file://{tmp_path / 'in'}"], out)
    items = plan_outputs(plan.pairs, [(1024, 1024), (320, 240)], "webp")
    assert [(Path(s).name, Path(d).name, w, h) for s, d, w, h in items] == [
        ("a.jpg", "a-1024.webp", 1024, 1024),
        ("a.jpg", "a-320x240.webp", 320, 240),
        ("a.png", "a-1024~2.webp", 1024, 1024),
        ("a.png", "a-320x240~2.webp", 320, 240),
    ]
    assert {str(Path(d).parent) for _, d, _, _ in items} == {str(out)}
    assert [Path(d).name for _, d, _, _ in plan_outputs(plan.pairs[:1], [(64, 64)], "keep")] == ["a.jpg"]


def test_the_job_carries_urls_sizes_and_options_never_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-send-me")
    items = [("s3://in/a.jpg", "s3://out/a-64.jpg", 64, 64), ("s3://in/a.jpg", "s3://out/a-32.jpg", 32, 32)]
    chord = build(builtin.resize_items(items, ResizeOptions(mode="fill").to_json(), "s3://out", 2), 1)
    header = list(chord.tasks)
    assert [t.task for t in header] == ["fanout.resize_items"] * 2
    start, rows, kwargs = header[1].args
    # The smallest box is the image's sheet item: it carries the image's index.
    assert (start, rows, kwargs["out_dir"]) == (
        1,
        [["s3://in/a.jpg", "s3://out/a-32.jpg", 32, 32, 0]],
        "s3://out",
    )
    assert header[0].args[1] == [["s3://in/a.jpg", "s3://out/a-64.jpg", 64, 64]]
    job_id = chord.body.kwargs["job"]["reduce_kwargs"]["job_id"]
    assert kwargs["sheet"] == {"images": 1, "tiles": f"s3://out/.fanout-tiles/{job_id}"}
    assert kwargs["options"]["mode"] == "fill"
    assert chord.body.kwargs["job"]["reduce_kwargs"]["per_image"] == 2
    assert "do-not-send-me" not in json.dumps([t.args for t in header] + [chord.body.kwargs])


# --- the fan-in's report ---------------------------------------------------------


def test_contact_sheet_puts_tiles_in_input_order_and_marks_failures() -> None:
    tiles = (
        [Image.new("RGB", (300, 200), c) for c in (RED, GREEN)] + [None] + [Image.new("RGB", (50, 50), BLUE)]
    )
    sheet = compose(tiles, columns=2)
    assert sheet.size == (2 * CELL + 12, 2 * CELL + 12)
    middle = CELL // 2
    for index, colour in ((0, RED), (1, GREEN), (3, BLUE)):
        x, y = cell_origin(index, 2)
        assert sheet.getpixel((x + middle, y + middle)) == colour, index
    x, y = cell_origin(2, 2)
    assert sheet.getpixel((x + middle, y + middle)) == MARKER  # the cross
    assert sheet.getpixel((x + 1, y + middle)) == MARKER  # the frame


def test_report_groups_outputs_by_image_and_writes_manifest_and_sheet(tmp_path: Path) -> None:
    def record(i: int, side: int) -> dict[str, object]:
        dst = tmp_path / f"{i}-{side}.png"
        Image.new("RGB", (side, side), (RED, GREEN, BLUE)[i]).save(dst)
        return {"source": f"s{i}", "destination": str(dst), "width": side, "height": side, "bytes": 10}

    part = {
        "start": 0,
        "results": [record(0, 64), record(0, 32), None, record(1, 32), record(2, 64), record(2, 32)],
        "errors": [{"index": 2, "input": "s1", "error": "corrupt image"}],
        "transient": 0,
    }
    outcome = merge([part], 6, "job", "resize")  # type: ignore[list-item]
    grouped = images(outcome, per_image=2)
    assert [(g["index"], g["source"], g["ok"], len(g["outputs"])) for g in grouped] == [
        (0, "s0", True, 2),
        (1, "s1", False, 1),
        (2, "s2", True, 2),
    ]
    assert grouped[1]["error"] == "corrupt image" and grouped[0]["bytes"] == 20
    written = write_report(str(tmp_path / "out"), outcome, per_image=2)
    assert written["manifest"] == str(tmp_path / "out" / MANIFEST)
    doc = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert (doc["images"], doc["outputs"], doc["failed"]) == (3, 5, 1)
    with Image.open(tmp_path / "out" / CONTACT_SHEET) as sheet:
        columns = 2  # columns_for(3)
        middle = CELL // 2
        for index, colour in ((0, RED), (1, MARKER), (2, BLUE)):
            x, y = cell_origin(index, columns)
            assert close(sheet.getpixel((x + middle, y + middle)), colour), index


def _resized(tmp_path: Path, colours: list[tuple[int, int, int] | None]) -> OutcomeDoc:
    """An outcome as the header tasks leave it: one output per colour (``None`` fails), tiles in one strip."""
    results: list[object] = []
    errors = []
    made: dict[int, Image.Image] = {}
    for i, colour in enumerate(colours):
        if colour is None:
            results.append(None)
            errors.append({"index": i, "input": f"s{i}", "error": "corrupt image"})
            continue
        src = tmp_path / "in" / f"{i}.png"
        src.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (300, 200), colour).save(src)

        def keep(out: Image.Image, image: int = i) -> None:
            made[image] = contact_sheet.make_tile(out)

        results.append(
            resize_to(str(src), str(tmp_path / "out" / f"{i}.png"), (200, 200), ResizeOptions(), keep)
        )
    sheets.write_strip(tiles_of(tmp_path), made, range(len(colours)))
    part = {"start": 0, "results": results, "errors": errors, "transient": 0}
    return merge([part], len(colours), "job", "resize")  # type: ignore[list-item]


def tiles_of(tmp_path: Path) -> str:
    return sheets.tiles_dir(str(tmp_path / "out"), "job")


def test_the_header_task_keeps_a_small_tile_of_each_output_in_its_batch_strip(tmp_path: Path) -> None:
    _resized(tmp_path, [RED, None, BLUE])
    (strip,) = Path(tiles_of(tmp_path)).iterdir()
    assert strip.name == "0-3-5.jpg"  # images 0 to 2, tiles for 0 and 2
    with Image.open(strip) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (3 * CELL, CELL))
        assert close(im.getpixel((CELL // 2, CELL // 2)), RED)
        assert close(im.getpixel((2 * CELL + CELL // 2, CELL // 2)), BLUE)
    assert strip.stat().st_size < 10_000
    seen: list[Image.Image] = []
    resize_to(str(tmp_path / "in" / "0.png"), str(tmp_path / "x.png"), (50, 50), ResizeOptions(), seen.append)
    assert [im.size for im in seen] == [(50, 33)]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"])
@pytest.mark.parametrize(
    ("size", "tile"), [((256, 144), (128, 72)), ((300, 7), (128, 3)), ((40, 30), (40, 30))]
)
def test_a_tile_is_rgb_within_a_cell_whatever_the_output_mode(
    mode: str, size: tuple[int, int], tile: tuple[int, int]
) -> None:
    made = contact_sheet.make_tile(Image.new(mode, size))
    assert (made.mode, made.size) == ("RGB", tile)


def test_the_sheet_is_pasted_from_tiles_without_reading_any_output_back(tmp_path: Path) -> None:
    outcome = _resized(tmp_path, [RED, None, BLUE])
    for record in filter(None, outcome["results"]):
        Path(record["destination"]).unlink()  # nothing left to read back: only the tiles
    written = write_report(
        str(tmp_path / "out"), outcome, tiles=sheets.tiles_dir(str(tmp_path / "out"), "job")
    )
    assert written["contact_sheets"] == [str(tmp_path / "out" / CONTACT_SHEET)]
    with Image.open(tmp_path / "out" / CONTACT_SHEET) as sheet:
        for index, colour in ((0, RED), (1, MARKER), (2, BLUE)):
            x, y = cell_origin(index, 2)
            assert close(sheet.getpixel((x + CELL // 2, y + CELL // 2)), colour), index
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONTACT_SHEET, MANIFEST]  # tiles gone
    doc = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert doc["contact_sheets"] == [CONTACT_SHEET]


def test_a_missing_tile_is_made_from_the_output_read_back(tmp_path: Path) -> None:
    outcome = _resized(tmp_path, [GREEN])
    for strip in Path(tiles_of(tmp_path)).iterdir():
        strip.unlink()
    write_report(str(tmp_path / "out"), outcome, tiles=tiles_of(tmp_path))
    with Image.open(tmp_path / "out" / CONTACT_SHEET) as sheet:
        x, y = cell_origin(0, 1)
        assert close(sheet.getpixel((x + CELL // 2, y + CELL // 2)), GREEN)


def test_a_large_run_gets_a_sheet_in_pages_a_viewer_opens_named_by_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert all(
        max(compose([None] * len(r), columns=c).size) <= PAGE_MAX for c, rs in [pages(10_000)] for r in rs
    )
    monkeypatch.setattr(contact_sheet, "PAGE_MAX", 2 * (CELL + GAP) + GAP)  # two rows a page
    colours: list[tuple[int, int, int] | None] = [RED] * 20
    colours[12] = None  # the first of the second page: columns_for(20) == 6
    outcome = _resized(tmp_path, colours)
    written = write_report(str(tmp_path / "out"), outcome, tiles=tiles_of(tmp_path))
    names = ["contact-sheet-1.jpg", "contact-sheet-2.jpg"]
    assert written["contact_sheets"] == [str(tmp_path / "out" / n) for n in names]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["contact_sheets"] == names
    with Image.open(tmp_path / "out" / names[1]) as page:
        assert page.height <= contact_sheet.PAGE_MAX
        x, y = cell_origin(0, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), MARKER)
        x, y = cell_origin(1, 6)
        assert close(page.getpixel((x + CELL // 2, y + CELL // 2)), RED)


def test_a_corrupt_image_fails_at_once_rather_than_as_transient(tmp_path: Path) -> None:
    whole = make_photo(tmp_path / "whole.jpg", (600, 400))
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(ImageError, match=r"cannot decode|corrupt") as info:
        resize_to(str(tmp_path / "cut.jpg"), str(tmp_path / "o.jpg"), (100, 100), ResizeOptions())
    assert info.value.item == str(tmp_path / "cut.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jpg", "whole.jpg"]


def test_a_missing_source_or_unwritable_destination_is_the_items_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        resize_to(str(tmp_path / "nope.jpg"), str(tmp_path / "o.jpg"), (10, 10), ResizeOptions())
    src = make_photo(tmp_path / "p.jpg", (64, 48))
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ImageError, match="cannot write") as info:
        resize_to(str(src), str(tmp_path / "a-file" / "o.jpg"), (10, 10), ResizeOptions())
    assert info.value.item == str(src)


def test_s3_endpoint_comes_from_the_environment_only() -> None:
    from workers.storage import _storage_options

    env = {"AWS_ENDPOINT_URL": "http://minio:9000"}
    assert _storage_options("s3", env) == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert _storage_options("s3", {**env, "AWS_ENDPOINT_URL_S3": "http://s3only:9000"}) == {
        "client_kwargs": {"endpoint_url": "http://s3only:9000"}
    }
    assert _storage_options("s3", {}) == {} and _storage_options("", env) == {}


def test_the_largest_batch_holds_about_a_fixed_number_of_source_bytes(tmp_path: Path) -> None:
    assert builtin.resize_batch_cap(None) == builtin.MAX_RESIZE_BATCH == 32  # an object store: not asked
    assert builtin.resize_batch_cap(70_000) == 32  # generated 1080p photos
    assert builtin.resize_batch_cap(1_200_000) == 32  # noisy ones
    assert builtin.resize_batch_cap(12_000_000) == 3  # scans
    assert builtin.resize_batch_cap(90_000_000) == 1
    (tmp_path / "a.jpg").write_bytes(b"x" * 1_000)
    (tmp_path / "b.jpg").write_bytes(b"x" * 3_000)
    assert mean_bytes([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "s3://in/c.jpg"]) == 2_000
    assert mean_bytes(["s3://in/c.jpg"]) is None
    items = [(str(tmp_path / "a.jpg"), str(tmp_path / "out" / "a.jpg"), 64, 64)]
    plan = builtin.resize_items(
        items, ResizeOptions().to_json(), str(tmp_path / "out"), 1, source_bytes=10_000_000
    )
    assert plan.spec.batch_cap == 4
