"""Local OCI images: layer merge rules, refusal of unsafe layers, and booting a merged image."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

import boxvm
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP
from boxvm.errors import ImageError
from boxvm.images import oci
from boxvm.images.default import ensure_slim
from boxvm.paths import Home
from boxvm.state.clones import Clones
from tests.helpers import build_layout


def _member(tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _layer(build: object, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)  # type: ignore[operator]
    data = buf.getvalue()
    return gzip.compress(data) if compress else data


def _unpack(tmp_path: Path, layers: list[bytes]) -> Path:
    layout = build_layout(tmp_path / "layout", layers, {"config": {}})
    root = tmp_path / "root"
    oci.unpack(oci.read_layout(layout, tmp_path), root)
    return root


def test_whiteouts_opaque_dirs_and_hardlinks(tmp_path: Path) -> None:
    def lower(tar: tarfile.TarFile) -> None:
        _member(tar, "keep", b"k")
        _member(tar, "gone", b"g")
        _member(tar, "dir", type=tarfile.DIRTYPE, mode=0o755)
        _member(tar, "dir/old", b"o")

    def upper(tar: tarfile.TarFile) -> None:
        _member(tar, ".wh.gone")
        _member(tar, "dir/new", b"n")
        _member(tar, "dir/.wh..wh..opq")
        _member(tar, "dir/hard", type=tarfile.LNKTYPE, linkname="dir/new")
        _member(tar, "suid", b"#!/bin/sh\n", mode=0o4755)

    root = _unpack(tmp_path, [_layer(lower), _layer(upper, compress=True)])
    assert sorted(p.name for p in root.iterdir()) == ["dir", "keep", "suid"]
    assert sorted(p.name for p in (root / "dir").iterdir()) == ["hard", "new"]
    assert (root / "dir" / "hard").stat().st_ino == (root / "dir" / "new").stat().st_ino
    assert (root / "suid").stat().st_mode & 0o7777 == 0o4755


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda t: _member(t, "/abs", b"x"), "escapes"),
        (lambda t: _member(t, "a/../../x", b"x"), "escapes"),
        (lambda t: (_member(t, "link", type=tarfile.SYMTYPE, linkname="/tmp"), _member(t, "link/f", b"x")), "symlink"),
        (lambda t: _member(t, "h", type=tarfile.LNKTYPE, linkname="../outside"), "escapes"),
        (lambda t: (_member(t, "file", b"x"), _member(t, "file/child", b"y")), "as a directory"),
    ],
)
def test_unsafe_layers_are_refused(tmp_path: Path, build: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        _unpack(tmp_path, [_layer(build)])
    assert not (tmp_path / "x").exists() and not Path("/tmp/f").exists()


def test_corrupt_blob_is_refused(tmp_path: Path) -> None:
    layout = build_layout(tmp_path / "layout", [_layer(lambda t: _member(t, "a", b"a"))], {"config": {}})
    blob = next(p for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > 1000)
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ImageError, match="does not match its digest"):
        oci.unpack(oci.read_layout(layout, tmp_path), tmp_path / "root")


@pytest.mark.asyncio
async def test_multi_layer_archive_boots_with_merged_fs_and_config(
    rt: boxvm.Runtime, home: Home, tmp_path: Path
) -> None:
    base = oci.read_layout(ensure_slim(home), tmp_path)  # busybox serves; a fifth of the default's bytes
    base_layer = (base.layout / "blobs" / "sha256" / base.layers[0].digest.split(":")[1]).read_bytes()

    def second(tar: tarfile.TarFile) -> None:
        _member(tar, "etc/motd", b"v2\n", mode=0o644)
        _member(tar, "opt/data", type=tarfile.DIRTYPE, mode=0o755)
        _member(tar, "opt/data/a", b"a\n")
        _member(tar, "opt/data/b", b"b\n")
        _member(tar, "usr/local/bin/hello", b"#!/bin/sh\necho hello\n", mode=0o4755)
        _member(tar, "home/user/own", b"mine\n", uid=1000, gid=1000, mode=0o600)
        _member(tar, "opt/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)

    def third(tar: tarfile.TarFile) -> None:
        _member(tar, "opt/data/.wh..wh..opq")
        _member(tar, "opt/data/c", b"c\n")
        _member(tar, "opt/data/c-link", type=tarfile.LNKTYPE, linkname="opt/data/c")
        _member(tar, "etc/.wh.motd")

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "FROM_IMAGE=yes"], "WorkingDir": "/opt/data"},
    }
    layout = build_layout(tmp_path / "layout", [base_layer, _layer(second, compress=True), _layer(third)], config)
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    box = await rt.create(boxvm.BoxOptions(image=str(archive)), name="t-oci-archive")
    try:
        await box.start()
        script = (
            "pwd; echo $FROM_IMAGE; ls /opt/data | tr '\\n' ' '; echo; test -e /etc/motd && echo motd || echo no-motd; "
            "stat -c '%a %u' /usr/local/bin/hello /home/user/own; stat -c '%t:%T' /opt/null; hello; "
            "stat -c %h /opt/data/c"
        )
        r = await box.exec(["sh", "-c", script])
        assert r.exit_code == 0, r.stderr
        assert r.stdout.decode().splitlines() == [
            "/opt/data", "yes", "c c-link ", "no-motd", "4755 0", "600 1000", "1:3", "hello", "2",
        ]  # fmt: skip
    finally:
        await rt.remove(box.id, force=True)


@pytest.mark.asyncio
async def test_an_image_is_not_removed_under_a_clone_of_a_removed_boxs_snapshot(
    rt: boxvm.Runtime, home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone of a snapshot holds the snapshot's layer, not its box: with the box removed,
    nothing else kept the image's removal (another process) from deleting the base disk
    under the clone being staged. The clone now holds the image until its record exists;
    the removal waits, then counts the clone and is refused."""
    tag = os.urandom(4).hex()
    layout = build_layout(tmp_path / "layout", [_layer(lambda t: _member(t, "tag", tag.encode()))], {"config": {}})
    box = await rt.create(boxvm.BoxOptions(image=str(layout), disk_size_gb=1), f"imgrace-{tag}")
    await box.snapshot.create("s")
    staged, go, seen = threading.Event(), threading.Event(), {}
    write = Clones._write

    def staging(self: Clones, *args: object, **kwargs: object) -> None:
        write(self, *args, **kwargs)  # type: ignore[arg-type]
        staged.set()
        go.wait(60)  # (this blocks the clone's event loop: the other caller has its own)

    async def remove_box_then_image() -> None:
        async with boxvm.Runtime(home.root) as other:
            await other.remove(box.id, force=True)
            removal = asyncio.ensure_future(other.images.remove(str(layout)))
            await asyncio.sleep(1.0)
            seen["waited"] = not removal.done()
            go.set()
            try:
                await removal
                seen["removed"] = True
            except boxvm.InvalidState as exc:
                seen["refused"] = str(exc)

    def other_caller() -> None:
        staged.wait(60)
        try:
            asyncio.run(remove_box_then_image())
        finally:
            go.set()

    monkeypatch.setattr(Clones, "_write", staging)
    thread = threading.Thread(target=other_caller)
    thread.start()
    try:
        clone = await box.clone(f"imgrace-{tag}-c", boxvm.CloneOptions(from_snapshot="s"))
    finally:
        go.set()
        thread.join(60)
    try:
        assert seen.get("waited") and f"imgrace-{tag}-c" in seen.get("refused", ""), seen
        chain = qcow2.chain(home.box_dir(clone.id) / TOP)
        assert all(p.exists() for p in chain) and len(chain) >= 3, chain  # its top, the layer, the base disk
    finally:
        await rt.remove(clone.id, force=True)
        await rt.images.remove(str(layout))
