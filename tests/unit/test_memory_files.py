"""The memory-state files without a VM: the sparse RAM copy, the soft-dirty fix-up of a running
copy, and the check that guards a resume."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import resource
import signal
import stat
from pathlib import Path

import pytest

from boxvm.engine import memory, memory_precopy
from boxvm.errors import EngineError, StorageError

PAGE = memory_precopy.PAGE
SHAPE = {"memory_mib": 1, "cpus": 1, "guest_bundle": "b" * 16}


def saved_state(box_dir: Path, state: bytes = b"QEVM" + os.urandom(5000)) -> None:
    memory.fresh_ram(box_dir, SHAPE["memory_mib"])
    (box_dir / memory.STATE).write_bytes(state)
    meta = {"version": 1, "state_bytes": len(state), "state_sha256": hashlib.sha256(state).hexdigest(), **SHAPE}
    (box_dir / memory.META).write_text(json.dumps(meta))


def test_sparse_copy_keeps_data_and_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        for offset in (0, 5 << 20, (64 << 20) - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    copied = memory.sparse_copy(src, tmp_path / "copy")
    dst = tmp_path / "copy"
    assert dst.read_bytes() == src.read_bytes()
    assert copied < 1 << 20 and dst.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never over an existing file
        memory.sparse_copy(src, dst)


def test_fresh_ram_is_private_sparse_and_replaces_any_state(tmp_path: Path) -> None:
    saved_state(tmp_path)
    memory.fresh_ram(tmp_path, 4)
    ram = (tmp_path / memory.RAM).stat()
    assert ram.st_size == 4 << 20 and ram.st_blocks == 0 and stat.S_IMODE(ram.st_mode) == 0o600
    assert not (tmp_path / memory.STATE).exists() and not (tmp_path / memory.META).exists()


def test_check_accepts_a_whole_state(tmp_path: Path) -> None:
    saved_state(tmp_path)
    memory.check(tmp_path, SHAPE)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / memory.STATE).write_bytes((d / memory.STATE).read_bytes()[:-1]), "its record says"),
        (lambda d: (d / memory.STATE).write_bytes(b"X" + (d / memory.STATE).read_bytes()[1:]), "checksum"),
        (lambda d: (d / memory.META).unlink(), "missing or unreadable"),
        (lambda d: (d / memory.META).write_text("{"), "missing or unreadable"),
        (lambda d: (d / memory.META).write_text("[]"), "unknown format"),
        (lambda d: os.truncate(d / memory.RAM, 2 << 20), "memory size"),
    ],
)
def test_check_refuses_a_damaged_state(tmp_path: Path, damage: object, message: str) -> None:
    saved_state(tmp_path)
    damage(tmp_path)  # type: ignore[operator]
    with pytest.raises(StorageError, match=message) as err:
        memory.check(tmp_path, SHAPE)
    assert str(tmp_path) not in str(err.value)


def test_check_refuses_a_state_of_another_machine_shape(tmp_path: Path) -> None:
    saved_state(tmp_path)
    with pytest.raises(StorageError, match="cpus=1"):
        memory.check(tmp_path, {**SHAPE, "cpus": 2})
    with pytest.raises(StorageError, match="guest_bundle"):
        memory.check(tmp_path, {**SHAPE, "guest_bundle": "c" * 16})


def _ram_with_data(path: Path, pages: tuple[int, ...]) -> None:
    memory.fresh_ram(path.parent, 1)
    with open(path, "r+b") as f:
        for page in pages:
            f.seek(page * PAGE)
            f.write(os.urandom(PAGE))


def _precopy(ram: Path, dest: Path) -> memory_precopy.PreCopy:
    """What memory_precopy.start leaves, for this process (whose soft-dirty bits are not cleared)."""
    memory.sparse_copy(ram, dest)
    return memory_precopy.PreCopy(os.getpid(), ram, dest, memory_precopy.data_extents(ram), memory_precopy._reclaimed())


def test_ram_mapping_is_found_by_device_and_inode_not_by_path(tmp_path: Path) -> None:
    ram = tmp_path / memory.RAM
    _ram_with_data(ram, (0,))
    other = tmp_path / "other"
    other.write_bytes(ram.read_bytes())
    with open(ram, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        moved = tmp_path / "moved"
        ram.rename(moved)  # the path in /proc/self/maps is now stale
        vmas = memory_precopy.ram_vmas(os.getpid(), moved)
        assert len(vmas) == 1 and vmas[0][1] - vmas[0][0] == len(mapped) and vmas[0][2] == 0
        assert memory_precopy.ram_vmas(os.getpid(), other) == []  # same bytes, another file


def test_soft_dirty_map_reads_bit_55_of_each_entry() -> None:
    entries = [0, 1 << 55, (1 << 63) | 5, (1 << 63) | (1 << 55) | 7]
    raw = b"".join(e.to_bytes(8, "little") for e in entries)
    assert memory_precopy.soft_dirty_map(raw) == bytes([0, 1, 0, 1])


def test_stopped_fixup_copies_written_pages_and_pages_allocated_since(tmp_path: Path) -> None:
    ram, dest = tmp_path / memory.RAM, tmp_path / "copy"
    _ram_with_data(ram, (0, 3))
    with open(ram, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        pre = _precopy(ram, dest)
        mapped[3 * PAGE : 3 * PAGE + 4] = b"new!"  # a page the running copy had: soft-dirty
        mapped[9 * PAGE : 9 * PAGE + 4] = b"new!"  # a hole then, allocated since
        copied, mode = memory_precopy.finish(pre, ram, dest)
        assert mode == "soft-dirty"
        got = dest.read_bytes()
        assert got[9 * PAGE : 10 * PAGE] == ram.read_bytes()[9 * PAGE : 10 * PAGE]  # by the extent rule
        if memory_precopy.supported():
            assert got == ram.read_bytes() and copied == 2 * PAGE
        else:  # this kernel sets no soft-dirty bit: only a full copy at the stop is right
            assert got[3 * PAGE : 3 * PAGE + 4] != b"new!"


@pytest.mark.parametrize("why", ["no mapping", "reclaim"])
def test_stopped_fixup_copies_everything_when_soft_dirty_cannot_vouch(tmp_path: Path, why: str) -> None:
    ram, dest = tmp_path / memory.RAM, tmp_path / "copy"
    _ram_with_data(ram, (0, 3))
    pre = _precopy(ram, dest)
    with open(ram, "r+b") as f:  # not through a mapping this process tracks
        f.seek(3 * PAGE)
        f.write(b"new!")
    if why == "reclaim":
        pre.reclaimed -= 1
    assert memory_precopy.finish(pre, ram, dest) == (2 * PAGE, "full")
    assert dest.read_bytes() == ram.read_bytes()
    assert memory_precopy.finish(None, ram, tmp_path / "fresh")[1] == "full"


def test_a_state_file_is_prefilled_and_cut_where_the_stream_ends(tmp_path: Path) -> None:
    """``StateFile``: the prefill is zeros the writer (QEMU, through the shared file
    offset) overwrites from the start; ``finish`` cuts the file at the writer's offset,
    also when the stream outgrew the prefill."""
    for prefill, stream in (((3 << 20) + 5, os.urandom((1 << 20) + 17)), (4096, os.urandom(3 * 4096 + 1))):
        path = tmp_path / f"state-{prefill}"
        state = memory.StateFile(path)
        try:
            assert state.prefill(prefill) == prefill
            assert path.stat().st_size == prefill and stat.S_IMODE(path.stat().st_mode) == 0o600
            assert os.lseek(state.fd, 0, os.SEEK_CUR) == 0
            writer = os.dup(state.fd)  # what QEMU holds: the same open file
            try:
                os.write(writer, stream)
            finally:
                os.close(writer)
            assert state.finish() == len(stream)
        finally:
            state.close()
        assert path.read_bytes() == stream
    with pytest.raises(EngineError, match="could not create the memory state file: File exists") as err:
        memory.StateFile(path)
    assert str(tmp_path) not in str(err.value)


def test_a_prefill_never_fills_the_disk_and_stops_at_a_failed_write(tmp_path: Path) -> None:
    """The prefill is a speed-up only: none where the filesystem has less than twice its
    size free, and a write that fails (here past RLIMIT_FSIZE, as ENOSPC would) ends it
    without an error; QEMU's own writes then meet the real limit."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    state = memory.StateFile(tmp_path / "big")
    try:
        assert state.prefill(free // 2 + (1 << 30)) == 0 and (tmp_path / "big").stat().st_size == 0
    finally:
        state.close()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        state = memory.StateFile(tmp_path / "limited")
        try:
            assert state.prefill(4 << 20) == 1 << 20
            assert state.finish() == 0  # nothing was streamed: the prefill goes
        finally:
            state.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert (tmp_path / "limited").stat().st_size == 0


def test_written_bytes_counts_the_pages_a_private_mapping_copied(tmp_path: Path) -> None:
    """What the guest wrote of a privately mapped RAM file is its anonymous pages there."""
    base = tmp_path / "memory.base"
    base.write_bytes(os.urandom(64 * PAGE))
    with open(base, "rb") as f, mmap.mmap(f.fileno(), 64 * PAGE, flags=mmap.MAP_PRIVATE) as ram:
        assert memory_precopy.written_bytes(os.getpid(), base) == 0
        for page in range(0, 40, 2):
            ram[page * PAGE] = 1
        assert memory_precopy.written_bytes(os.getpid(), base) == 20 * PAGE
    assert memory_precopy.written_bytes(os.getpid(), base) == 0


def _copied_written(ram: Path, copy: Path) -> int:
    """``copy`` made a copy of ``ram`` with this process's written pages of it over it."""
    written = memory_precopy.WrittenPages(os.getpid(), ram)
    try:
        memory.sparse_copy(ram, copy)
        return written.copy_to(copy)
    finally:
        written.close()


def test_written_pages_are_what_a_private_mapping_copied_and_only_those(tmp_path: Path) -> None:
    """``WrittenPages`` (here of this very process): the pages written through a private
    mapping of a RAM file, found by pagemap and read from /proc/<pid>/mem, copied over a
    copy of the file make it what the mapping shows; the file itself is never written."""
    ram, copy = tmp_path / "memory.base", tmp_path / "memory.ram"
    pages = 64
    with open(ram, "wb") as f:  # data in the first half, a hole after
        f.write(os.urandom(32 * PAGE))
        f.truncate(pages * PAGE)
    original = ram.read_bytes()
    with open(ram, "rb") as f, mmap.mmap(f.fileno(), pages * PAGE, flags=mmap.MAP_PRIVATE) as view:
        view[: pages * PAGE : PAGE]  # every page read: mapped, but none of them written
        for page in (0, 1, 2, 17, 40, 63):  # runs, data and hole pages alike
            view[page * PAGE + 5] = (view[page * PAGE + 5] + 1) % 256
        assert _copied_written(ram, copy) == 6 * PAGE
        assert copy.read_bytes() == view[:]
    assert ram.read_bytes() == original


def test_written_pages_of_a_file_mapped_in_pieces_land_at_their_file_offsets(tmp_path: Path) -> None:
    """Two mappings of one RAM file's halves, wherever the kernel puts them: each written
    page is found and copied at its own offset in the file."""
    ram, copy = tmp_path / "memory.base", tmp_path / "memory.ram"
    half = 16 * PAGE
    ram.write_bytes(os.urandom(2 * half))
    with open(ram, "rb") as f:
        high = mmap.mmap(f.fileno(), half, flags=mmap.MAP_PRIVATE, offset=0)
        low = mmap.mmap(f.fileno(), half, flags=mmap.MAP_PRIVATE, offset=half)
    try:
        high[3 * PAGE] = (high[3 * PAGE] + 1) % 256
        low[7 * PAGE + 9] = (low[7 * PAGE + 9] + 1) % 256
        assert _copied_written(ram, copy) == 2 * PAGE
        assert copy.read_bytes() == high[:] + low[:]
    finally:
        high.close()
        low.close()


def test_written_pages_need_qemus_mapping_of_the_whole_file(tmp_path: Path) -> None:
    ram = tmp_path / "memory.base"
    ram.write_bytes(os.urandom(8 * PAGE))
    with pytest.raises(memory_precopy.Unavailable, match="does not map the whole RAM file"):
        memory_precopy.WrittenPages(os.getpid(), ram)  # nothing of this process maps it


def test_a_state_says_whether_it_has_a_configuration_section(tmp_path: Path) -> None:
    state = tmp_path / memory.STATE
    state.write_bytes(b"QEVM\0\0\0\3\x07\0\0\0\x07microvm")  # a migration's: the configuration first
    assert memory.has_configuration(state)
    state.write_bytes(b"QEVM\0\0\0\3\x04\0\0\0\x01")  # the devices alone: a section at once
    assert not memory.has_configuration(state)
    assert memory.has_configuration(tmp_path / "missing")  # the default; its load fails on its own
