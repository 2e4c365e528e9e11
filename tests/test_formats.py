"""Every format Pillow reads and writes, in each mode it stores, with each codec option: resized.

The corpus is generated (:func:`tests.corpus.formats`, 151 files of 48 x 32
pixels).  One ``fanout resize --format keep`` job sends all of it through a real
worker; each case then checks its own output's format, mode and size.  The
cases that stay errors, and why, are listed in docs/formats.md.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from orchestrator.local import LocalWorker
from tests.conftest import TEST_REDIS_URL, fanout_command
from tests.corpus import (
    ORIENTING_DECODERS,
    SHOWN_SIZE,
    FormatCase,
    OrientedCase,
    formats,
    oriented,
)
from workers import resizing
from workers.errors import ImageError, TransientError
from workers.resizing import WRITES, ResizeOptions, kept_suffix, output_size, resize_to, save_params

# Pillow 13 deprecates its IM format (removal in Pillow 15); until then it reads and writes it.
pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")

CASES = formats(Path("corpus"), write=False)
BOX = (24, 24)


# --- the tables, against the Pillow installed (no broker) ----------------------


@pytest.mark.parametrize(("fmt", "mode"), [(f, m) for f, modes in WRITES.items() for m in sorted(modes)])
def test_every_mode_a_format_is_said_to_store_is_written_by_pillow(fmt: str, mode: str) -> None:
    im = Image.new(mode, (40, 30))
    if mode == "P":
        im.putpalette(list(range(256)) * 3)
    buffer = io.BytesIO()
    im.save(buffer, fmt, **save_params(fmt, im, {}, ResizeOptions()))
    if fmt == "EPS":
        return  # reading it back needs Ghostscript
    with Image.open(io.BytesIO(buffer.getvalue())) as back:
        assert back.size == (40, 30)


@pytest.mark.parametrize(
    ("suffix", "kept"),
    [(".tif", ".tif"), (".JPG", ".JPG"), (".psd", ".png"), (".icns", ".png"), (".xpm", ".png"), (".x", ".x")],
)
def test_keep_names_an_output_written_as_png_with_png(suffix: str, kept: str) -> None:
    assert kept_suffix(suffix) == kept


def test_an_encoder_that_refuses_the_image_is_the_items_error_not_a_transient_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "grey.tif"
    Image.linear_gradient("L").save(source, compression="tiff_lzw")
    # As the old code did: Group 4 on an image that is not 1-bit.
    monkeypatch.setattr(resizing, "save_params", lambda *args: {"compression": "group4"})
    with pytest.raises(ImageError) as info:
        resize_to(str(source), str(tmp_path / "out.tif"), BOX, ResizeOptions())
    assert not isinstance(info.value, TransientError)
    assert "cannot encode as TIFF (L)" in info.value.reason
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize(
    ("name", "header"),
    [("BUFR", b"BUFR"), ("GRIB", b"GRIB\x00\x00\x00\x01"), ("HDF5", b"\x89HDF\r\n\x1a\n")],
)
def test_a_format_pillow_only_identifies_is_an_error_naming_the_missing_loader(
    tmp_path: Path, name: str, header: bytes
) -> None:
    source = tmp_path / f"data.{name.lower()}"
    source.write_bytes(header + b"\x00" * 64)
    with pytest.raises(ImageError) as info:
        resize_to(str(source), str(tmp_path / "out.png"), BOX, ResizeOptions())
    assert info.value.reason == f"cannot decode: cannot find loader for this {name} file"


@pytest.mark.parametrize(
    ("choice", "modes"),
    [("jpeg", {"L", "RGB", "CMYK"}), ("png", {"L", "LA", "RGB", "RGBA", "I;16"}), ("webp", {"RGB", "RGBA"})],
)
def test_every_image_of_the_corpus_converts_to_each_output_format(
    tmp_path: Path, choice: str, modes: set[str]
) -> None:
    wrong = []
    for case in formats(tmp_path / "in"):
        if case.error:
            continue
        destination = tmp_path / "out" / f"{case.name}.{choice}"
        resize_to(str(case.path), str(destination), BOX, ResizeOptions(format=choice))
        with Image.open(destination) as im:
            size = output_size(case.size, BOX, "fit", False)
            if (im.format, im.size) != (choice.upper(), size) or im.mode not in modes:
                wrong.append(f"{case.name}: {im.format} {im.mode} {im.size}")
    assert not wrong


# --- the orientation, applied exactly once whichever decoder reads it (no broker) --


@pytest.fixture(scope="module")
def oriented_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OrientedCase]:
    return {case.name: case for case in oriented(tmp_path_factory.mktemp("oriented"))}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("decoder", list(ORIENTING_DECODERS))
def test_the_orientation_is_applied_exactly_once_whichever_decoder_reads_it(
    oriented_cases: dict[str, OrientedCase], tmp_path: Path, decoder: str, orientation: int
) -> None:
    """Each source shows 590 x 88 with a dark block top-left, as ``exif_transpose`` would show it.

    Pillow's TIFF reader turns the picture itself as it loads; a second turn made
    Group 4 orientations 5-8 come out 10 x 64, a picture 590 wide squeezed into 10.
    """
    case = oriented_cases[f"{decoder}-{orientation}"]
    for mode, box, dark, light in [
        # fit: the whole picture at 64 x 10, the block over x < 21, y < 5.
        ("fit", (64, 64), [(1, 1), (17, 3)], [(25, 2), (62, 1), (1, 8), (62, 8)]),
        # fill from the top-left: 134 x 20 cut to 20 x 20, the block over its top half.
        ("fill", (20, 20), [(1, 1), (18, 7)], [(1, 18), (18, 18)]),
    ]:
        destination = tmp_path / f"{mode}.png"
        options = ResizeOptions(mode=mode, anchor="top-left", format="png")
        record = resize_to(str(case.path), str(destination), box, options)
        with Image.open(destination) as im:
            grey = im.convert("L")
        assert grey.size == (record["width"], record["height"]) == output_size(SHOWN_SIZE, box, mode, False)
        assert [xy for xy in dark if _level(grey, xy) > 64] == [], f"{mode}: not dark"
        assert [xy for xy in light if _level(grey, xy) < 192] == [], f"{mode}: not white"


def _level(grey: Image.Image, xy: tuple[int, int]) -> int:
    value = grey.getpixel(xy)
    assert isinstance(value, int)
    return value


# --- the corpus through a real worker, as one job --------------------------------


@pytest.fixture(scope="module")
def corpus_run(worker: LocalWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``fanout resize`` over the whole corpus: the JSON document, keyed by source file name."""
    root = tmp_path_factory.mktemp("formats")
    cases = formats(root / "in")
    assert [c.name for c in cases] == [c.name for c in CASES]
    out = root / "out"
    proc = subprocess.run(
        fanout_command("resize", str(root / "in"), "--out", str(out), "--max-side", str(BOX[0]), "--json"),
        env={**os.environ, "FANOUT_REDIS_URL": TEST_REDIS_URL},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout, proc.stderr
    doc = json.loads(proc.stdout)
    yield {
        "code": proc.returncode,
        "doc": doc,
        "out": out,
        "results": {Path(r["source"]).name: r for r in doc["results"] if r},
        "errors": {Path(e["input"]).name: e["error"] for e in doc["errors"]},
    }


@pytest.mark.system
def test_the_corpus_is_one_job_with_every_file_accounted_for(corpus_run: dict[str, Any]) -> None:
    doc = corpus_run["doc"]
    assert (doc["total"], doc["skipped"]) == (len(CASES), 0)
    expected_errors = {c.path.name for c in CASES if c.error}
    assert set(corpus_run["errors"]) == expected_errors
    assert corpus_run["code"] == (1 if expected_errors else 0)
    # The callback pasted the header tasks' tiles into the sheet, then deleted them.
    out: Path = corpus_run["out"]
    assert (out / "contact-sheet.jpg").exists() and (out / "manifest.json").exists()
    assert not list(out.rglob(".*.tile.jpg"))


@pytest.mark.system
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_image_pillow_reads_is_resized_in_a_mode_its_format_stores(
    corpus_run: dict[str, Any], case: FormatCase
) -> None:
    name = case.path.name
    if case.error:
        assert case.error in corpus_run["errors"][name]
        return
    assert name not in corpus_run["errors"], corpus_run["errors"].get(name)
    record = corpus_run["results"][name]
    destination = Path(record["destination"])
    assert destination.suffix == kept_suffix(case.path.suffix)
    with Image.open(destination) as im:
        im.load()
        assert (im.format, im.mode) == (case.fmt, case.mode)
        assert im.size == output_size(case.size, BOX, "fit", False) == (record["width"], record["height"])
