"""System test: ``fanout resize`` with several sizes, a mode and a format, through real workers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.local import LocalWorker
from tests.conftest import fanout_command, marked_cells

pytestmark = pytest.mark.system


def test_cli_resize_several_sizes_fill_webp_with_manifest_and_contact_sheet(
    cli_env: dict[str, str], worker: LocalWorker, photos: Path, tmp_path: Path
) -> None:
    (photos / "p6-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = tmp_path / "out"
    args = ["resize", str(photos), "--out", f"file://{out}", "--size", "120x80", "--size", "48"]
    proc = subprocess.run(
        fanout_command(*args, "--mode", "fill", "--anchor", "top", "--format", "webp", "--quality", "70"),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"contact sheet: {out / 'contact-sheet.jpg'}" in proc.stderr
    assert f"manifest: {out / 'manifest.json'}" in proc.stderr
    # Text output: one line per output written.
    lines = proc.stdout.splitlines()
    assert len(lines) == 12 and all("(120x80," in line or "(48x48," in line for line in lines)

    for i in range(6):
        for name, size in ((f"p{i}-120x80.webp", (120, 80)), (f"p{i}-48.webp", (48, 48))):
            with Image.open(out / name) as im:
                assert (im.format, im.size) == ("WEBP", size), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["images"], manifest["outputs"], manifest["failed"]) == (7, 12, 2)
    assert [item["source"].rsplit("/", 1)[1] for item in manifest["items"]] == [
        "p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg", "p5.jpg", "p6-broken.jpg",
    ]  # fmt: skip
    assert [len(item["outputs"]) for item in manifest["items"]] == [2] * 6 + [0]
    assert all(o["seconds"] > 0 and o["bytes"] > 0 for item in manifest["items"] for o in item["outputs"])

    assert marked_cells(out / "contact-sheet.jpg", 7) == [6]  # the broken image's cell, and no other


def test_cli_resize_json_lists_every_output(
    cli_env: dict[str, str], worker: LocalWorker, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = ["resize", str(photos), "--out", str(out), "--max-side", "100", "--size", "30x60", "--json"]
    proc = subprocess.run(fanout_command(*cmd), env=cli_env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["contact_sheet"] == str(out / "contact-sheet.jpg")
    assert [len(image["outputs"]) for image in doc["images"]] == [2] * 6
    for image in doc["images"]:
        for record in image["outputs"]:
            with Image.open(record["destination"]) as im:
                assert im.size == (record["width"], record["height"])
                assert im.width <= record["box"][0] and im.height <= record["box"][1]
    assert [r["box"] for r in doc["results"][:2]] == [[30, 60], [100, 100]]
