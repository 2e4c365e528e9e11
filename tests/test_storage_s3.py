"""``s3://`` for real: an S3-compatible server (moto) on loopback, real workers, bucket to bucket.

The workers and the CLI find the server through the standard variables only
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL); see ``s3_env``
in conftest.py.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from orchestrator.inputs import plan_images
from orchestrator.local import LocalWorker
from orchestrator.samples import make_photo
from tests.conftest import fanout_command, marked
from workers import storage
from workers.contact_sheet import CELL, cell_origin, columns_for

pytestmark = pytest.mark.system


@pytest.fixture
def s3(s3_env: dict[str, str]) -> Iterator[Any]:
    """A boto3 client on the test server, independent of fanout's own code, with two empty buckets."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    for bucket in ("photos", "thumbs"):
        client.create_bucket(Bucket=bucket)
    yield client
    for bucket in ("photos", "thumbs"):
        for key in keys(client, bucket):
            client.delete_object(Bucket=bucket, Key=key)
        client.delete_bucket(Bucket=bucket)
    storage.filesystem("s3://photos")[0].invalidate_cache()


def keys(client: Any, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def key_of(url: str) -> str:
    """The key of an ``s3://thumbs/...`` URL."""
    assert url.startswith("s3://thumbs/"), url
    return url.removeprefix("s3://thumbs/")


def fetch_image(client: Any, bucket: str, key: str) -> Image.Image:
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


def upload_photos(client: Any, tmp_path: Path) -> None:
    """Four photos under 2024/ (one portrait by EXIF, one in a sub-prefix), a note and a corrupt JPEG."""
    for i, name in enumerate(["a.jpg", "b.jpg", "trip/c.jpg", "trip/d.jpg"]):
        photo = make_photo(tmp_path / f"{i}.jpg", (800, 600), seed=i, orientation=6 if i == 1 else None)
        client.put_object(Bucket="photos", Key=f"2024/{name}", Body=photo.read_bytes())
    client.put_object(Bucket="photos", Key="2024/notes.txt", Body=b"not an image")
    client.put_object(Bucket="photos", Key="2024/trip/e.jpg", Body=b"\xff\xd8\xff\xe0 not really")
    client.put_object(Bucket="photos", Key="elsewhere/z.jpg", Body=b"outside the prefix")


def test_storage_reads_writes_and_lists_objects(s3: Any, tmp_path: Path) -> None:
    upload_photos(s3, tmp_path)
    assert storage.exists("s3://photos/2024") and storage.is_file("s3://photos/2024/a.jpg")
    assert not storage.exists("s3://photos/nothing-here")
    size = storage.write_atomic("s3://thumbs/x/y.bin", lambda fh: fh.write(b"one put"))
    assert size == 7 and s3.get_object(Bucket="thumbs", Key="x/y.bin")["Body"].read() == b"one put"
    assert storage.read_bytes("s3://thumbs/x/y.bin") == b"one put"
    listed = storage.list_files("s3://photos/2024", exclude="s3://photos/2024/trip")
    assert listed == ["s3://photos/2024/a.jpg", "s3://photos/2024/b.jpg", "s3://photos/2024/notes.txt"]
    plan = plan_images(["s3://photos/2024/"], "s3://thumbs/small")
    assert plan.pairs[2] == ("s3://photos/2024/trip/c.jpg", "s3://thumbs/small/trip/c.jpg")
    assert len(plan.pairs) == 5 and plan.skipped == ["s3://photos/2024/notes.txt"]


def test_resize_from_bucket_to_bucket_through_real_workers(
    s3: Any, worker: LocalWorker, cli_env: dict[str, str], tmp_path: Path
) -> None:
    upload_photos(s3, tmp_path)
    args = ["resize", "s3://photos/2024", "--out", "s3://thumbs/small", "--size", "200", "--size", "64x64"]
    proc = subprocess.run(
        fanout_command(*args, "--mode", "fill", "--format", "png", "--json", "--batch-size", "1"),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 1, proc.stderr  # the corrupt JPEG fails; the rest succeed
    doc = json.loads(proc.stdout)
    assert (doc["total"], doc["succeeded"], doc["failed"], doc["skipped"]) == (10, 8, 2, 1)
    assert doc["manifest"] == "s3://thumbs/small/manifest.json"
    assert [e["input"] for e in doc["errors"]] == ["s3://photos/2024/trip/e.jpg"] * 2

    # Every output of every item, read back from the bucket by another client.
    outputs = [r for r in doc["results"] if r is not None]
    assert [r["destination"] for r in outputs] == [
        f"s3://thumbs/small/{name}-{size}.png"
        for name in ("a", "b", "trip/c", "trip/d")
        for size in ("200", "64")
    ]
    for record in outputs:
        key = key_of(record["destination"])
        im = fetch_image(s3, "thumbs", key)
        assert im.format == "PNG" and im.size == (record["width"], record["height"])
        assert im.size in ((200, 200), (64, 64))
        assert record["bytes"] == len(s3.get_object(Bucket="thumbs", Key=key)["Body"].read())

    # Grouped by image in the JSON and in the manifest, written to the bucket by the callback.
    assert [(i["source"].rsplit("/", 1)[1], i["ok"], len(i["outputs"])) for i in doc["images"]] == [
        ("a.jpg", True, 2),
        ("b.jpg", True, 2),
        ("c.jpg", True, 2),
        ("d.jpg", True, 2),
        ("e.jpg", False, 0),
    ]
    manifest = json.loads(s3.get_object(Bucket="thumbs", Key="small/manifest.json")["Body"].read())
    assert [item["ok"] for item in manifest["items"]] == [True, True, True, True, False]
    assert "cannot decode" in manifest["items"][4]["error"]

    # The contact sheet: the fifth tile carries the failure marker; the others show photos.
    sheet = fetch_image(s3, "thumbs", "small/contact-sheet.jpg")
    columns = columns_for(5)
    x, y = cell_origin(4, columns)
    assert marked(sheet.getpixel((x + CELL // 2, y + CELL // 2)))
    x, y = cell_origin(0, columns)
    assert not marked(sheet.getpixel((x + CELL // 2, y + CELL // 2)))

    # Nothing else in the bucket: no temporary or half-written objects.
    expected = {key_of(r["destination"]) for r in outputs} | {
        "small/manifest.json",
        "small/contact-sheet.jpg",
    }
    assert set(keys(s3, "thumbs")) == expected
