"""The ``memory.state`` archive member (``boxvm/memarchive.py``) and its place in a ``.boxsnap``:
round trips keep the RAM's holes, and every malformed or hostile member is refused before
anything large is allocated. No VM: the RAM and device state are made up here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from boxvm import archive, memarchive
from boxvm.disks import qcow2
from boxvm.errors import ArchiveError
from tests.helpers import rewrite_member

RAM_MIB = 128  # the smallest memory size a box may have


def _ram(tmp_path: Path) -> Path:
    """A sparse RAM file: a few data extents, one of them partly zero, the rest holes."""
    ram = tmp_path / "memory.ram"
    with open(ram, "wb") as f:
        f.truncate(RAM_MIB << 20)
        f.seek(0)
        f.write(os.urandom(64 << 10))
        f.seek(5 << 20)
        f.write(os.urandom(4096) + bytes(2 << 20) + os.urandom(4096))  # zero pages inside an extent
        f.seek((RAM_MIB << 20) - 8192)
        f.write(os.urandom(8192))
    return ram


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "memory.devstate.src"
    state.write_bytes(b"QEVM" + os.urandom(70_000))
    return state


def _member(tmp_path: Path) -> tuple[memarchive.Plan, bytes]:
    plan = memarchive.plan(_state(tmp_path), _ram(tmp_path), RAM_MIB << 20)
    return plan, b"".join(bytes(c) for c in plan.chunks())


def _receive(data: bytes, work: Path, size: int | None = None) -> memarchive.Received:
    work.mkdir(exist_ok=True)
    chunks = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
    return memarchive.receive(chunks, len(data) if size is None else size, work, "test.boxsnap")


def test_round_trip_keeps_the_bytes_and_the_holes(tmp_path: Path) -> None:
    plan, data = _member(tmp_path)
    assert len(data) == plan.size  # known before a byte of RAM was read
    assert plan.size < 4 << 20  # the holes (most of the 128 MiB) cost nothing
    got = _receive(data, tmp_path / "in")
    assert got.checksum == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert got.ram_bytes == RAM_MIB << 20
    assert got.state.read_bytes() == (tmp_path / "memory.devstate.src").read_bytes()
    assert got.ram is not None and plan.ram is not None
    assert got.ram.read_bytes() == plan.ram.read_bytes()
    assert got.ram.stat().st_blocks * 512 < 1 << 20, "the zero pages and holes were written out"
    assert got.ram.stat().st_mode & 0o777 == 0o600


def test_a_fragmented_ram_round_trips_through_its_table(tmp_path: Path) -> None:
    """Every other page written: 15,000 extents, a table larger than a stream chunk, read
    back from a file (never held in memory) while the RAM is written."""
    ram = tmp_path / "memory.ram"
    page = os.urandom(4096)
    with open(ram, "wb") as f:
        f.truncate(RAM_MIB << 20)
        for i in range(15_000):
            f.seek(i * 8192)
            f.write(page)
    plan = memarchive.plan(_state(tmp_path), ram, RAM_MIB << 20)
    assert len(plan.extents) == 15_000
    got = _receive(b"".join(bytes(c) for c in plan.chunks()), tmp_path / "in")
    assert got.ram is not None and got.ram.read_bytes() == ram.read_bytes()
    assert not (tmp_path / "in" / "memory.extents").exists()


def test_a_state_that_holds_the_ram_travels_without_a_table(tmp_path: Path) -> None:
    """A fork's saved state is QEMU's plain migration with the RAM inside (``STREAM``)."""
    stream = tmp_path / "stream"
    stream.write_bytes(os.urandom(3 << 20))
    plan = memarchive.plan(stream, None, RAM_MIB << 20)
    data = b"".join(bytes(c) for c in plan.chunks())
    got = _receive(data, tmp_path / "in")
    assert got.ram is None and got.state.read_bytes() == stream.read_bytes()
    with pytest.raises(ArchiveError, match="extents"):  # a table where the stream holds the RAM
        _receive(_with_header(data, count=1), tmp_path / "in2")


def _with_header(data: bytes, **fields: int) -> bytes:
    magic, version, flags, ram, state, count = struct.unpack_from("<8sIIQQQ", data)
    values = {"version": version, "flags": flags, "ram": ram, "state": state, "count": count, **fields}
    head = struct.pack("<8sIIQQQ24x", magic, *values.values())
    return head + data[memarchive.HEADER_BYTES :]


def _extent_table_at(data: bytes) -> int:
    state = struct.unpack_from("<Q", data, 24)[0]
    return memarchive.HEADER_BYTES + state


HOSTILE = {
    "bad magic": (lambda d: b"NOTBOXVM" + d[8:], "not a boxvm memory state"),
    "newer format": (lambda d: _with_header(d, version=9), "upgrade boxvm"),
    "unknown flags": (lambda d: _with_header(d, flags=6), "flags"),
    "RAM of 1 TiB": (lambda d: _with_header(d, ram=1 << 40), "RAM size"),
    "RAM not in pages": (lambda d: _with_header(d, ram=(RAM_MIB << 20) + 1), "RAM size"),
    "device state of 4 GiB": (lambda d: _with_header(d, state=4 << 30), "saved state of"),
    "extents beyond the member": (lambda d: _with_header(d, count=1 << 20), "extents"),
    "extents out of order": (
        lambda d: d[: _extent_table_at(d)] + d[_extent_table_at(d) + 16 : _extent_table_at(d) + 32]
        + d[_extent_table_at(d) : _extent_table_at(d) + 16] + d[_extent_table_at(d) + 32 :],
        "out of order",
    ),
    "extent past the RAM": (
        lambda d: d[: _extent_table_at(d)] + struct.pack("<QQ", (RAM_MIB << 20) - 4096, 64 << 10)
        + d[_extent_table_at(d) + 16 :],
        "out of order, empty or past the end",
    ),
    "extent sizes do not add up": (
        lambda d: d[: _extent_table_at(d) + 8] + struct.pack("<Q", 4096) + d[_extent_table_at(d) + 16 :],
        "extents hold",
    ),
    "truncated": (lambda d: d[: len(d) // 2], "truncated"),
    "shorter than a header": (lambda d: d[:40], "shorter than its header"),
}  # fmt: skip


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_malformed_member_is_refused(tmp_path: Path, attack: str) -> None:
    _plan, data = _member(tmp_path)
    alter, message = HOSTILE[attack]
    bad = alter(data)
    size = len(data) if attack == "truncated" else len(bad)  # the tar header still says the full size
    with pytest.raises(ArchiveError, match=message):
        _receive(bad, tmp_path / "in", size)
    ram = tmp_path / "in" / "memory.ram"
    assert not ram.exists() or attack in ("truncated", "extent sizes do not add up"), "RAM written before the map"


# -- in an archive -----------------------------------------------------------------------
SECTION = {"machine": "microvm", "memory_mib": RAM_MIB, "cpus": 1, "guest_bundle": "bundle-1", "qemu_version": "7.2.22"}


def _archive(tmp_path: Path, *, compress: bool = False, section: dict[str, Any] | None = None) -> tuple[bytes, dict]:
    disk = tmp_path / "top.qcow2"
    qcow2.write_overlay(disk, 64 << 20, None)
    plan = memarchive.plan(_state(tmp_path), _ram(tmp_path), RAM_MIB << 20)
    out = io.BytesIO()
    manifest = archive.write_stream(
        disk, out, {"box_name": "b", "memory": section or SECTION}, compress=compress, level=1, memory=plan
    )
    return out.getvalue(), manifest


def _read(data: bytes, work: Path) -> archive.VerifiedArchive:
    work.mkdir()
    return archive.read_archive(io.BufferedReader(io.BytesIO(data)), work, 1 << 40, label="test.boxsnap")  # type: ignore[arg-type]


def test_an_archive_carries_the_memory_state_and_says_what_it_needs(tmp_path: Path) -> None:
    data, manifest = _archive(tmp_path, compress=True)
    assert manifest["version"] == 2
    assert manifest["memory"] == {**SECTION, "format": memarchive.VERSION, "ram_bytes": RAM_MIB << 20}
    verified = _read(data, tmp_path / "in")
    assert verified.memory is not None
    assert verified.manifest["memory"] == {**SECTION, "format": 1}
    assert verified.manifest["memory_state_checksum"] == verified.memory.checksum
    assert verified.manifest["members"][archive.MEMORY] == manifest["members"][archive.MEMORY]
    assert verified.memory.ram is not None
    assert verified.memory.ram.read_bytes() == (tmp_path / "memory.ram").read_bytes()


def _manifest(change: Any) -> Any:
    def edit(body: bytes) -> bytes:
        m = json.loads(body)
        change(m)
        return json.dumps(m).encode()

    return edit


def _flip(body: bytes) -> bytes:
    at = len(body) - 5000  # inside the RAM's last extent
    return body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :]


REFUSED = {
    "a flipped RAM byte": (archive.MEMORY, _flip, "does not match its checksum"),
    "no checksum": (archive.MANIFEST, _manifest(lambda m: m.pop("memory_state_checksum")), "checksum"),
    "no memory section": (archive.MANIFEST, _manifest(lambda m: m.pop("memory")), "no 'memory' object"),
    "newer memory format": (archive.MANIFEST, _manifest(lambda m: m["memory"].update(format=7)), "upgrade boxvm"),
    "memory size not the RAM's": (
        archive.MANIFEST, _manifest(lambda m: m["memory"].update(memory_mib=256)), "not the manifest's memory size"
    ),
    "bad bundle name": (archive.MANIFEST, _manifest(lambda m: m["memory"].update(guest_bundle="../x")), "guest bundle"),
    "member size not the manifest's": (
        archive.MANIFEST, _manifest(lambda m: m["members"].update({archive.MEMORY: 1})), "the manifest says"
    ),
    "a sparse-sized member": (archive.MEMORY, lambda b: b + bytes(4096), "extents hold"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_archive_with_a_bad_memory_state_is_refused(tmp_path: Path, case: str) -> None:
    data, _ = _archive(tmp_path)
    member, change, message = REFUSED[case]
    with pytest.raises(ArchiveError, match=message):
        _read(rewrite_member(data, member, change), tmp_path / "in")


def test_a_memory_state_is_refused_unless_the_new_box_matches(tmp_path: Path) -> None:
    want = {"guest_bundle": "bundle-1", "memory_mib": RAM_MIB, "cpus": 1}
    memarchive.require_fits("a", SECTION, want)
    for change, message in (
        ({"machine": "q35"}, "'q35' machine"),
        ({"guest_bundle": "bundle-2"}, "guest bundle 'bundle-2'"),
        ({"memory_mib": 256}, "memory size"),
        ({"cpus": 2}, "CPU count"),
    ):
        with pytest.raises(ArchiveError, match=message):
            memarchive.require_fits("a", {**SECTION, **change}, want)


def test_the_machine_type_is_the_one_boxes_boot() -> None:
    from boxvm.engine import qemu

    source = Path(qemu.__file__).read_text()
    assert f'"-M", "{memarchive.MACHINE},' in source


def test_a_suspended_box_exported_without_its_options_gets_its_machine_size() -> None:
    """``include_metadata=False`` drops box options; the memory section still sizes the box,
    else the import would give it the default 512 MiB and refuse its own memory state."""
    from boxvm.state.transfer import options_from_manifest

    manifest = {"disk_virtual_size": 1 << 30, "memory": {**SECTION, "cpus": 2}}
    options = options_from_manifest(manifest, untrusted=False)
    assert (options["memory_mib"], options["cpus"]) == (RAM_MIB, 2)
    memarchive.require_fits("a", {**SECTION, "cpus": 2}, {"guest_bundle": "bundle-1", **options})


def test_a_ram_file_cut_short_while_exported_is_an_archive_error(tmp_path: Path) -> None:
    """The RAM is read in pieces of one reused buffer (``streams.pread_views``): a file that
    ends before its planned extents is a clear error, never a short member."""
    plan = memarchive.plan(_state(tmp_path), _ram(tmp_path), RAM_MIB << 20)
    assert plan.ram is not None
    os.truncate(plan.ram, 6 << 20)  # inside the extent at 5 MiB
    with pytest.raises(ArchiveError, match="shrank while it was being exported"):
        for _ in plan.chunks():
            pass
