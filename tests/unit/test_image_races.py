"""Images made and removed at once. An image's base disk is built once per home and size: a
second build (other bytes, since mke2fs picks a new UUID and checksum seed) must never take
the name that boxes already run on, or their layers end up over another file system (the
Ray test's corrupted forks). A removal waits for a create under way and then counts its box;
two resolves of one digest under two names keep both names."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from boxvm.build.outputs import building
from boxvm.errors import InvalidState, NotFound
from boxvm.images import ImageStore, ResolvedImage
from boxvm.paths import Home
from boxvm.store import Store
from tests.helpers import build_layout


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("etc", "root"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        data = b"hello\n"
        info = tarfile.TarInfo("etc/motd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _images(tmp_path: Path) -> ImageStore:
    home = Home(tmp_path / "home")
    home.ensure()
    return ImageStore(home, Store(home.db))


def test_concurrent_first_creates_share_one_build(tmp_path: Path) -> None:
    images = _images(tmp_path)
    layout = build_layout(tmp_path / "layout", [_layer()], {"config": {}})
    image = ResolvedImage("test/tiny", "sha256:" + "ab" * 32, {"config": {}}, layout)
    said: list[str] = []
    seen: list[tuple[Path, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def create() -> None:
        start.wait()
        try:
            path = images.base_disk(image, 1, said.append)
            seen.append((path, os.stat(path).st_ino))  # what a box made now would boot on
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum("converting" in line for line in said) == 1  # one build, the others waited for it
    (path,) = {p for p, _ino in seen}
    assert {ino for _p, ino in seen} == {os.stat(path).st_ino}  # never replaced under an earlier caller
    assert images.base_disk(image, 1, said.append) == path and os.stat(path).st_ino == seen[0][1]


async def test_a_removal_waits_for_a_create_and_counts_its_box(tmp_path: Path) -> None:
    """Before, the removal counted the boxes on the image before a create under way had its
    record, and deleted the base disk that create's box was being made over."""
    images = _images(tmp_path)
    image = images.resolve(str(build_layout(tmp_path / "layout", [_layer()], {"config": {}})))
    boxes: list[str] = []
    async with images.in_use(image.digest):
        base = images.base_disk(image, 1)
        removal = asyncio.ensure_future(images.remove(image.reference, lambda digest: list(boxes)))
        await asyncio.sleep(0.5)
        assert not removal.done() and base.exists()  # it waits for the create
        boxes.append("new-box")  # the create's record
    with pytest.raises(InvalidState, match="new-box"):
        await removal
    assert base.exists()
    boxes.clear()
    await images.remove(image.reference, lambda digest: list(boxes))
    assert not base.exists()
    with pytest.raises(NotFound):  # a create that resolved it just before the removal
        async with images.in_use(image.digest):
            pass


def test_two_names_of_one_digest_both_stay(tmp_path: Path) -> None:
    """Two resolves of one image under two names, each before the other made its record:
    the second record's REPLACE cascaded the first name away."""
    images = _images(tmp_path)
    layout = build_layout(tmp_path / "layout", [_layer()], {"config": {}})
    first = images.resolve(str(layout))
    record = images.store.get_image(first.digest)
    assert record is not None
    images.store.put_image(record.__class__(first.digest, "second/name", record.config, record.size_bytes))
    images.store.add_image_ref("second/name", first.digest)
    refs = images.store.image_refs()
    assert refs[first.reference] == refs["second/name"] == first.digest
    assert images.find(first.reference).reference == first.reference  # the first name stays its name


def test_builds_of_one_output_take_turns(tmp_path: Path) -> None:
    """The guest bundle and the built-in images are built under ``building``: concurrent
    first uses each ran a whole build before (minutes of mmdebstrap, GBs in tmp/)."""
    dest, spans = tmp_path / "images" / "slim" / "0123", []

    def build() -> None:
        with building(dest):
            began = time.monotonic()
            time.sleep(0.2)
            spans.append((began, time.monotonic()))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # never two at once
