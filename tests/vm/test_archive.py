"""Export and import: VM round trips (stopped and running boxes), and an adversarial corpus
of archives, each of which must be refused with ArchiveError leaving nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import zstandard

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.disks import qcow2
from boxvm.paths import Home
from tests.helpers import leftovers, released

pytestmark = [pytest.mark.asyncio, pytest.mark.backends("local", "remote")]
WRITER = "i=0; while true; do i=$((i+1)); echo $i >> /root/counter; sync /root/counter; done"
SLIM = boxvm.BoxOptions(image="boxvm/slim")  # busybox has every tool used here; its disk is 1/5 of the default's
SOURCE = pytest.mark.xdist_group("archive-source")  # the tests reading one stopped source run on one worker


@dataclass(frozen=True)
class Source:
    box: boxvm.Box  # seen through the local backend
    blob_sha256: bytes  # of /root/blob, 4 MiB of random bytes; /root/origin holds "made-in-boxlite"


@pytest_asyncio.fixture(scope="module")
async def source(local: LocalBackend) -> AsyncIterator[Source]:
    """One stopped box with data, for the tests that only export it or read its disk (for
    both backends: the remote one reaches it through the server over the same home)."""
    rt = boxvm.Runtime(backend=local)
    box = await rt.create(SLIM, name=f"archive-src-{os.urandom(2).hex()}")
    try:
        await box.start()
        script = "dd if=/dev/urandom of=/root/blob bs=1M count=4 2>/dev/null; echo made-in-boxlite > /root/origin"
        assert (await box.exec(["sh", "-c", script])).exit_code == 0
        digest = (await box.exec(["sha256sum", "/root/blob"])).stdout.split()[0]
        await box.stop()
        yield Source(box, digest)
    finally:
        await rt.remove(box.id, force=True)


@SOURCE
async def test_stopped_round_trip_twice(rt: boxvm.Runtime, source: Source, tmp_path: Path, backend_kind: str) -> None:
    src = await rt.get(source.box.id)
    assert src is not None
    path = await src.export(tmp_path)  # a directory: <name>.boxsnap inside it
    assert path == tmp_path / f"{src.name}.boxsnap" and path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial files
    with pytest.raises(boxvm.AlreadyExists):
        await src.export(path)
    first = await rt.import_box(path, name=f"{src.name}-{backend_kind}-i1")
    second = await rt.import_box(path, name=f"{src.name}-{backend_kind}-i2")
    try:
        assert first.id != second.id
        for box in (first, second):
            await box.start()
            assert (await box.exec(["sha256sum", "/root/blob"])).stdout.split()[0] == source.blob_sha256
            assert (await box.exec(["cat", "/etc/hostname"])).stdout.decode().strip() == box.name
        await first.exec(["sh", "-c", "echo only-first > /root/mine"])
        assert (await second.exec(["test", "-e", "/root/mine"])).exit_code == 1
    finally:
        await rt.remove(first.id, force=True)
        await rt.remove(second.id, force=True)


@pytest.mark.backends("local")  # the REST path of this operation is covered elsewhere; the suite has a time budget
async def test_running_export_is_point_in_time(
    rt: boxvm.Runtime, home: Home, fresh_slim_box: boxvm.Box, tmp_path: Path
) -> None:
    await fresh_slim_box.start()
    writer = await fresh_slim_box.spawn(["sh", "-c", WRITER])
    await asyncio.sleep(1.5)
    layers = home.root / "layers"
    depth, owned = (await fresh_slim_box.info()).chain_depth, set(layers.iterdir())
    before = len((await fresh_slim_box.exec(["cat", "/root/counter"])).stdout.split())
    path = await fresh_slim_box.export(tmp_path / "live.boxsnap", boxvm.ExportOptions(compress=False))
    after = len((await fresh_slim_box.exec(["cat", "/root/counter"])).stdout.split())
    info = await fresh_slim_box.info()
    assert info.status == boxvm.BoxStatus.RUNNING and info.timings["pause_ms"] < 1000
    # the capture is released in the background: the chain gets as long as before and
    # no layer is left behind
    await released(fresh_slim_box, depth)
    assert set(layers.iterdir()) == owned
    # and again, around a snapshot (which does keep its layer), while the writer runs on
    await fresh_slim_box.snapshot.create("mid")
    depth = (await fresh_slim_box.info()).chain_depth
    again = await fresh_slim_box.export(tmp_path / "again.boxsnap")
    await released(fresh_slim_box, depth)
    writer.kill()
    await writer.wait()
    source = [int(x) for x in (await fresh_slim_box.exec(["cat", "/root/counter"])).stdout.split()]
    assert source == list(range(1, len(source) + 1))
    await fresh_slim_box.stop()
    top = home.box_dir(fresh_slim_box.id) / "disk.qcow2"
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
    await fresh_slim_box.start()  # the source's own disk, after two releases, holds every write
    assert [int(x) for x in (await fresh_slim_box.exec(["cat", "/root/counter"])).stdout.split()] == source
    imported = await rt.import_box(path, name=f"{fresh_slim_box.name}-live")
    second = await rt.import_box(again, name=f"{fresh_slim_box.name}-again")
    try:
        await imported.start()
        got = [int(x) for x in (await imported.exec(["cat", "/root/counter"])).stdout.split()]
        assert got == list(range(1, len(got) + 1)) and before <= len(got) <= after < len(source)
        assert got == source[: len(got)]
        await second.start()
        later = [int(x) for x in (await second.exec(["cat", "/root/counter"])).stdout.split()]
        assert len(got) < len(later) <= len(source) and later == source[: len(later)]
    finally:
        await rt.remove(imported.id, force=True)
        await rt.remove(second.id, force=True)


# -- the adversarial corpus (no VM needed: import refuses before any box exists) ---------


def small_disk(tmp: Path, backing: str | None = None) -> bytes:
    path = tmp / f"disk-{os.urandom(3).hex()}.qcow2"
    qcow2.write_overlay(path, 64 << 20, backing, "raw")
    subprocess.run(["qemu-io", "-c", "write -P 0x42 0 256k", str(path)], check=True, capture_output=True)
    return path.read_bytes()


def manifest_for(disk: bytes, **overrides: object) -> bytes:
    body = {
        "format": "boxvm-archive",
        "version": 1,
        "box_name": "evil",
        "image": "boxvm/default",
        "container_disk_checksum": "sha256:" + hashlib.sha256(disk).hexdigest(),
        "guest_disk_checksum": "",
        "disk_virtual_size": 64 << 20,
        "members": {"disk.qcow2": len(disk)},
        **overrides,
    }
    return json.dumps(body).encode()


def build(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], compress: bool = True) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    data = buf.getvalue()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def valid(tmp: Path) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    disk = small_disk(tmp)
    return [("disk.qcow2", disk), ("manifest.json", manifest_for(disk))]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def case_bitflip(tmp: Path) -> Path:
    disk = small_disk(tmp)
    return build(tmp / "a", [("disk.qcow2", flip(disk, len(disk) - 100)), ("manifest.json", manifest_for(disk))])


def case_truncated(at: float, compress: bool) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = build(tmp / "a", valid(tmp), compress)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * at)])
        return path

    return make


def case_manifest(**overrides: object) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        disk = small_disk(tmp)
        return build(tmp / "a", [("disk.qcow2", disk), ("manifest.json", manifest_for(disk, **overrides))])

    return make


def case_members(extra: Callable[[Path], list[tarfile.TarInfo | tuple[str, bytes]]]) -> Callable[[Path], Path]:
    return lambda tmp: build(tmp / "a", extra(tmp))


def case_backing_file(tmp: Path) -> Path:
    disk = small_disk(tmp, backing="/etc/passwd")
    return build(tmp / "a", [("disk.qcow2", disk), ("manifest.json", manifest_for(disk))])


def case_l1_past_eof(tmp: Path) -> Path:
    disk = bytearray(small_disk(tmp))
    disk[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset far beyond the file
    return build(tmp / "a", [("disk.qcow2", bytes(disk)), ("manifest.json", manifest_for(bytes(disk)))])


def case_huge_declared(tmp: Path) -> Path:
    """A header declaring 1 PiB: refused from the header, before a byte is read."""
    raw = bytearray(build(tmp / "a", valid(tmp), compress=False).read_bytes())
    info = tarfile.TarInfo("disk.qcow2")
    info.size = 1 << 50
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    path = tmp / "b"
    path.write_bytes(header + bytes(raw[512:4096]))
    return path


CORPUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "bit flip in the disk": (case_bitflip, "checksum"),
    "bit flip in the manifest": (
        case_members(lambda t: [valid(t)[0], ("manifest.json", flip(valid(t)[1][1], 0))]),
        "not valid JSON",
    ),
    "truncated zstd 10%": (case_truncated(0.1, True), "truncated or corrupt"),
    "truncated zstd 60%": (case_truncated(0.6, True), "truncated or corrupt"),
    "truncated zstd 99%": (case_truncated(0.99, True), "truncated or corrupt"),
    "truncated tar 50%": (case_truncated(0.5, False), "truncated"),
    "wrong checksum": (case_manifest(container_disk_checksum="sha256:" + "0" * 64), "checksum"),
    "size differs from manifest": (case_manifest(members={"disk.qcow2": 12}), "bytes, the manifest says"),
    "newer version": (case_manifest(version=99), "upgrade boxvm"),
    "version of wrong type": (case_manifest(version="1"), "integer"),
    "foreign format": (case_manifest(format="something-else"), "not a boxvm-archive"),
    "virtual size mismatch": (case_manifest(disk_virtual_size=1 << 30), "virtual size"),
    "missing manifest": (case_members(lambda t: valid(t)[:1]), "no manifest"),
    "missing disk": (case_members(lambda t: valid(t)[1:]), "no disk.qcow2"),
    "manifest not json": (case_members(lambda t: [valid(t)[0], ("manifest.json", b"{not json")]), "not valid JSON"),
    "manifest first is fine but extra member": (
        case_members(lambda t: [valid(t)[1], valid(t)[0], ("notes.txt", b"hi")]),
        "unexpected member",
    ),
    "duplicate disk": (case_members(lambda t: [*valid(t), valid(t)[0]]), "duplicate"),
    "path traversal": (case_members(lambda t: [("../disk.qcow2", b"x"), *valid(t)]), "unexpected member"),
    "absolute path": (case_members(lambda t: [("/etc/passwd", b"x"), *valid(t)]), "unexpected member"),
    "symlink member": (
        case_members(lambda t: [special("disk.qcow2", tarfile.SYMTYPE, "/etc/passwd"), valid(t)[1]]),
        "link, device",
    ),
    "hardlink member": (
        case_members(lambda t: [special("disk.qcow2", tarfile.LNKTYPE, "manifest.json"), valid(t)[1]]),
        "link, device",
    ),
    "device node": (case_members(lambda t: [special("disk.qcow2", tarfile.CHRTYPE), valid(t)[1]]), "link, device"),
    "qcow2 with a host backing file": (case_backing_file, "backing file"),
    "qcow2 table past EOF": (case_l1_past_eof, "past the end"),
    "declared size beyond the limit": (case_huge_declared, "over the limit"),
}


@pytest.mark.parametrize("case", list(CORPUS))
async def test_hostile_archives_are_refused_and_leave_nothing(
    rt: boxvm.Runtime, home: Home, tmp_path: Path, case: str, backend_kind: str, request: pytest.FixtureRequest
) -> None:
    make, message = CORPUS[case]
    archive = make(tmp_path)
    pids = [os.getpid()] + ([request.getfixturevalue("server").pid] if backend_kind == "remote" else [])
    with pytest.raises(boxvm.ArchiveError, match=message):
        await rt.import_box(archive, name="hostile")
    assert await rt.get("hostile") is None and leftovers(home, pids) == []


@pytest.mark.parametrize("manifest_first", [False, True])
async def test_a_valid_synthetic_archive_is_accepted(rt: boxvm.Runtime, tmp_path: Path, manifest_first: bool) -> None:
    """The corpus's starting point is itself importable, in either member order: the
    refusals above are specific."""
    members = valid(tmp_path)
    if manifest_first:
        members.reverse()
    box = await rt.import_box(build(tmp_path / "ok.boxsnap", members), name=f"t-synthetic-ok-{manifest_first}")
    try:
        assert (await box.info()).status == boxvm.BoxStatus.STOPPED
    finally:
        await rt.remove(box.id)


async def test_export_to_a_full_disk_leaves_no_partial_file(rt: boxvm.Runtime, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test mounts a small tmpfs and needs root (CI runs as root)"
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    box = await rt.create(name="t-export-full")
    try:
        with pytest.raises(boxvm.StorageError, match="no space left"):
            await box.export(mnt / "box.boxsnap", boxvm.ExportOptions(compress=False))
        assert os.listdir(mnt) == []
        for _ in range(100):  # over REST the server learns of the hang-up a moment later
            if (await box.info()).status == boxvm.BoxStatus.CONFIGURED:
                break
            await asyncio.sleep(0.1)
        assert (await box.info()).status == boxvm.BoxStatus.CONFIGURED  # the claim was released
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        await rt.remove(box.id)


@SOURCE
async def test_boxlite_archives_import_and_boot(
    rt: boxvm.Runtime, source: Source, tmp_path: Path, local: LocalBackend, backend_kind: str
) -> None:
    """BoxLite writes the manifest first, has no format field, checksums from v2, options
    from v3; its disk.qcow2 is a standalone qcow2 holding an ext4 root filesystem."""
    disk = tmp_path / "disk.qcow2"
    top = local.home.box_dir(source.box.id) / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(top), str(disk)], check=True)
    data = disk.read_bytes()
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()

    def boxlite(version: int, compress: bool, **extra: object) -> Path:
        manifest: dict[str, object] = {
            "version": version,
            "box_name": "from-boxlite",
            "image": "alpine:latest",
            "guest_disk_checksum": "",
            "container_disk_checksum": checksum if version >= 2 else "",
            "exported_at": "2026-01-01T00:00:00Z",
        }
        if version >= 3:
            manifest["box_options"] = {"cpus": 1, "memory_mib": 256, "ports": [{"guest_port": 80}], "env": {}}
        manifest.update(extra)
        return build(
            tmp_path / f"v{version}.boxlite",
            [("manifest.json", json.dumps(manifest).encode()), ("disk.qcow2", data)],
            compress,
        )

    imported = []
    try:
        for version, compress in ((3, True), (1, False), (5, True)):
            imported.append(
                await rt.import_box(boxlite(version, compress), name=f"t-boxlite-{backend_kind}-v{version}")
            )
        box = imported[0]
        assert (await box.info()).memory_mib == 256
        await box.start()
        assert (await box.exec(["cat", "/root/origin"])).stdout == b"made-in-boxlite\n"
        with pytest.raises(boxvm.ArchiveError, match="version 6 is not supported"):
            await rt.import_box(boxlite(6, True), name="t-boxlite-v6")
        with pytest.raises(boxvm.ArchiveError, match="checksum"):
            await rt.import_box(boxlite(2, True, container_disk_checksum="sha256:" + "1" * 64), name="t-bl-bad")
    finally:
        for box in imported:
            await rt.remove(box.id, force=True)
