"""An image's base disk is built once per home and size: a second build (other bytes, since
mke2fs picks a new UUID and checksum seed) must never take the name that boxes already run
on, or their layers end up over another file system (the Ray test's corrupted forks)."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

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


def test_concurrent_first_creates_share_one_build(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.ensure()
    store = Store(home.db)
    images = ImageStore(home, store)
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
