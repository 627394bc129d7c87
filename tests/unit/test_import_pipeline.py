"""The import's pipeline (``archive._DiskSink``, ``streams.ReadAhead``, ``pump`` with a
``Source``): a worker thread's failure is the import's error, a cancelled import stops
every thread it started, and neither leaves anything in the home. No VM: the archives
fail verification before a box would need a guest bundle."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import os
import resource
import signal
import tarfile
import threading
import time
import types
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest

from boxvm import archive
from boxvm.disks import qcow2
from boxvm.disks.layers import LayerStore
from boxvm.errors import StorageError
from boxvm.images import ImageStore
from boxvm.paths import Home
from boxvm.progress import silent
from boxvm.state.boxes import Boxes
from boxvm.state.context import Context
from boxvm.state.snapshots import Snapshots
from boxvm.state.transfer import Transfer
from boxvm.store import Store
from boxvm.streams import FileSource, ReadAhead, Source

MIB = 1 << 20


def _transfer(root: Path) -> Transfer:
    home = Home.default(root)
    home.ensure()
    store = Store(home.db)
    return Transfer(Snapshots(Boxes(Context(home, store, ImageStore(home, store), LayerStore(home), silent))))


def _archive(tmp_path: Path, data_mib: int) -> bytes:
    """A tar whose disk member starts with a real qcow2 header (so it is not refused early)
    and goes on with ``data_mib`` MiB of random bytes."""
    header = tmp_path / "header.qcow2"
    qcow2.write_overlay(header, 4 << 30, None)
    disk = header.read_bytes() + os.urandom(data_mib * MIB)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(archive.DISK)
        info.size = len(disk)
        tar.addfile(info, io.BytesIO(disk))
    return out.getvalue()


def _open_files() -> list[str]:
    """What this process's descriptors name (a file removed since ends in " (deleted)")."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own, another thread's)
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
    return names


def _import_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("boxvm-import", "boxvm-read-ahead", "test-"))]


def _nothing_left(transfer: Transfer) -> None:
    assert transfer.store.list_boxes() == []
    assert [p.name for p in transfer.home.tmp.iterdir()] == []
    assert list(transfer.home.boxes.iterdir()) == []
    assert _import_threads() == []


# 8 MiB: a direct run meets the limit at its start; 6 MiB: in its middle, so the direct write
# is short and its rest, written buffered, fails
@pytest.mark.parametrize("limit_mib", [8, 6])
async def test_a_write_failure_in_the_disk_thread_is_the_imports_error_and_leaves_nothing(
    tmp_path: Path, limit_mib: int
) -> None:
    path = tmp_path / "big.boxsnap"
    path.write_bytes(_archive(tmp_path, 24))
    transfer = _transfer(tmp_path / "home")
    # A real write failure: past RLIMIT_FSIZE the kernel fails write(2) with EFBIG (SIGXFSZ
    # ignored), as a full disk fails it with ENOSPC, in the thread that writes the disk.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mib * MIB, limits[1]))
    try:
        with pytest.raises(StorageError, match="could not write the imported disk: File too large"):
            await transfer.import_stream(lambda: FileSource(path), None, True, path.name)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    _nothing_left(transfer)
    assert not [f for f in _open_files() if f.startswith(str(transfer.home.tmp))]  # the disk is closed


def test_a_write_failure_does_not_leave_the_reading_thread_blocked(tmp_path: Path) -> None:
    """The disk thread keeps draining after its failure, so a reader far ahead of it (the
    queue full) gets the error at its next put instead of waiting forever."""
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)  # every write fails (EBADF)
    sink = archive._DiskSink(fd)
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="could not write the imported disk"):
            for i in range(64):
                sink.put(i * MIB, b"\1" * MIB)
            sink.finish()
        assert time.monotonic() - t0 < 10
    finally:
        sink.close()
        os.close(fd)
    assert _import_threads() == []


class Slow(Source):
    """An archive arriving slowly through a read-ahead thread (a download)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.sent, self.closed = data, 0, threading.Event()

    async def chunks(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        raise AssertionError("an in-process import must read the source directly")
        yield b""

    def open(self) -> ReadAhead:
        def produce() -> Generator[bytes, None, None]:
            try:
                for at in range(0, len(self.data), MIB):
                    time.sleep(0.02)
                    self.sent = at + MIB
                    yield self.data[at : at + MIB]
            finally:
                self.closed.set()

        return ReadAhead(produce, depth=4, name="test-download")


async def test_a_cancelled_import_stops_its_threads_and_leaves_nothing(tmp_path: Path) -> None:
    source = Slow(_archive(tmp_path, 48))
    transfer = _transfer(tmp_path / "home")
    task = asyncio.ensure_future(transfer.import_stream(lambda: source, None, True, "slow.boxsnap"))
    while source.sent < 8 * MIB:  # well into the disk member: the disk thread is running
        await asyncio.sleep(0.01)
    assert "boxvm-import-write" in _import_threads()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert source.closed.is_set()
    assert source.sent < len(source.data)  # stopped, not read to the end
    _nothing_left(transfer)


async def test_an_import_cancelled_after_its_last_read_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its checks run (the input all read, the archive not yet a box): a
    ``Source`` is read by the worker itself, which the cancel does not stop, so the worker
    must see the cancel before its commit; else the caller sees CancelledError and the box
    exists anyway."""
    path = tmp_path / "in.boxsnap"
    path.write_bytes(b"x" * MIB)
    checking, reached = threading.Event(), []

    def read_archive(source: io.RawIOBase, *_: object) -> object:
        while source.read(MIB):
            pass
        checking.set()
        time.sleep(0.3)  # qemu-img check and the qcow2 walk
        return types.SimpleNamespace(manifest={"disk_virtual_size": 1 << 30}, memory=None, disk=tmp_path / "none")

    transfer = _transfer(tmp_path / "home")
    monkeypatch.setattr(archive, "read_archive", read_archive)
    monkeypatch.setattr(Boxes, "bundle", lambda self: reached.append("bundle"))
    task = asyncio.ensure_future(transfer.import_stream(lambda: FileSource(path), None, True, "in.boxsnap"))
    await asyncio.to_thread(checking.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert reached == []  # it stopped before building the box
    _nothing_left(transfer)


def _writes() -> list[tuple[int, bytes]]:
    """What an import may write: contiguous aligned runs (ours), a jump, a run past the
    writer's bounce buffer, and pieces a hostile or foreign archive may bring (unaligned
    offsets and lengths, a chunk larger than the buffer)."""
    chunk = [os.urandom(MIB) for _ in range(6)]
    return [
        (0, chunk[0]),
        (MIB, chunk[1]),  # joins the run
        (3 * MIB, chunk[2][: 64 << 10]),  # a hole before it: a new run
        (3 * MIB + (64 << 10) + 100, chunk[3][:5000]),  # unaligned offset and length: buffered
        (5 * MIB, chunk[4]),
        *[(6 * MIB + i * MIB, chunk[5]) for i in range(5)],  # crosses the 4 MiB buffer
        (12 * MIB, os.urandom(6 * MIB)),  # larger than the buffer: buffered
        (19 * MIB + 512, chunk[0][:8192]),  # aligned length, unaligned offset
    ]


def _written(path: Path, writes: list[tuple[int, bytes]]) -> None:
    """Run ``writes`` through a disk writer of a new file at ``path``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    writer = archive._DiskWriter(fd)
    try:
        for off, data in writes:
            writer.write(off, data)
        writer.flush()
    finally:
        writer.close()
        os.close(fd)


def _holds(path: Path, writes: list[tuple[int, bytes]]) -> None:
    expected = bytearray(max(off + len(data) for off, data in writes))
    for off, data in writes:
        expected[off : off + len(data)] = data
    assert path.read_bytes() == expected


def test_the_disk_writer_puts_every_byte_where_it_belongs(tmp_path: Path) -> None:
    """Direct runs and buffered pieces land at their offsets and holes stay zero, on a file
    system that takes O_DIRECT (the tests' tmp, as a home's)."""
    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o600)
    direct = archive._reopen_direct(fd)
    assert direct is not None  # else this test would not test the direct writes
    os.close(direct)
    os.close(fd)
    writes = _writes()
    _written(tmp_path / "disk.qcow2", writes)
    _holds(tmp_path / "disk.qcow2", writes)


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where O_DIRECT is refused at open (tmpfs before Linux 6.6, some network file systems;
    none here, so the refusal is simulated), every write goes through the page cache."""
    real_open = os.open

    def refusing(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing)
    writes = _writes()
    _written(tmp_path / "disk.qcow2", writes)
    _holds(tmp_path / "disk.qcow2", writes)


def test_a_direct_write_the_device_refuses_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device wanting a larger alignment than 4 KiB refuses a direct write with EINVAL (no
    such device here, so the refusal is simulated): the run is written buffered, and so is
    everything after it."""
    real_pwrite, direct_writes = os.pwrite, []

    def refusing(fd: int, data: bytes, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    writes = _writes()
    _written(tmp_path / "disk.qcow2", writes)
    assert direct_writes == [0]  # one refusal, then no more tries
    _holds(tmp_path / "disk.qcow2", writes)
