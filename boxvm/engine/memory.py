"""Memory state of a box: its RAM file plus QEMU's device state, saved and loaded over QMP.

A box's guest RAM is a ``memory-backend-file`` in its directory (``memory.ram``, mapped
``share=on``), so the RAM never needs copying: with QEMU's ``x-ignore-shared`` capability a
``migrate`` writes only the device state (tens of KB) to ``memory.state`` while the vCPUs
are stopped, and a new QEMU with the same command line plus ``-incoming defer`` maps the
same file and loads that state back (``migrate-incoming``). QEMU 7.2 has no ``file:``
migration URI: a save writes to a file descriptor boxvm hands over (``QMP.migrate_to_fd``),
a load reads a descriptor handed over the same way.

``memory.json`` records the state file's size and SHA-256 and the shape of the machine it
belongs to, written last (after an fsync of both files): a state without a matching
record is never loaded, so a crash mid-save or a damaged file leaves a box that boots cold
from its disk instead of resuming garbage.

Where the RAM is (the record's ``ram``): ``file`` — ``memory.ram``, the box's own, mapped
``share=on``; ``base`` — ``memory.base``, a hard link to a memory snapshot's (or template's)
RAM that a fork maps ``share=off``: a private copy-on-write mapping, so every fork reads the
same page-cache pages and its writes stay in its own anonymous memory (the file is never
written: a box has no balloon or virtio-mem, the only things that make QEMU punch holes in
a RAM file). A fork's own suspend or memory snapshot copies the base with the pages the guest
wrote over it (read out of QEMU: ``memory_precopy.WrittenPages``) into a ``file`` RAM, beside
a state of the devices alone (``QMP.save_devices``, which has no configuration section: see
``has_configuration``). Where those pages cannot be read, and for a memory snapshot under KVM,
``stream`` — inside the state file itself: QEMU's migration of the whole RAM (zero pages are
a flag each), live while the guest runs under KVM (``memory_live``), loaded into a fresh RAM
file on resume, after which it is a ``file`` box again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from boxvm import faults
from boxvm.errors import EngineError, InvalidState, StorageError

RAM = "memory.ram"
BASE = "memory.base"  # a fork's read-only view of a snapshot's RAM (mapped share=off)
STATE = "memory.state"
META = "memory.json"
CAPTURE = "memory-capture"  # a memory snapshot's files, until the snapshot's record takes them
SNAPSHOTS = "memory-snapshots"  # the memory snapshots' files, a directory each named by its id
MAX_STATE = 64 << 20  # device state is tens of KB; anything near this is not ours
MIGRATE_TIMEOUT = 60.0
T = TypeVar("T")
_QEMU_VM_CONFIGURATION = 0x07  # the section type after the stream's magic and version (8 bytes)


class Qmp(Protocol):
    """What this module needs of a monitor (``engine.qmp.QMP``)."""

    async def status(self) -> str: ...
    async def stop(self) -> None: ...
    async def migrate_set_capabilities(self, capabilities: dict[str, bool]) -> None: ...
    async def migrate_to_fd(self, fd: int) -> None: ...
    async def save_devices(self, path: Path) -> None: ...
    async def migrate_incoming_from(self, path: Path) -> None: ...
    async def query_migrate(self) -> dict[str, Any]: ...


async def _wait_migration(qmp: Qmp, incoming: bool) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration completes; raise if it fails."""
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    delay = 0.001
    while True:
        info = await qmp.query_migrate()
        status = info.get("status")
        if status == "completed":
            if not incoming:
                await settled(qmp)
            return info
        if status in ("failed", "cancelled"):
            what = "loading" if incoming else "saving"
            raise EngineError(f"{what} the memory state failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise EngineError(f"the memory state migration did not finish in {MIGRATE_TIMEOUT:g} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


async def settled(qmp: Qmp) -> None:
    """Wait until QEMU has left ``finish-migrate`` after a completed outgoing migration: it
    sets ``postmigrate`` a moment after announcing completion (not under its lock), and a
    ``cont`` in that moment would leave a running VM in ``postmigrate``."""
    deadline = time.monotonic() + 5
    while await qmp.status() == "finish-migrate" and time.monotonic() < deadline:
        await asyncio.sleep(0.0005)


async def check_savable(qmp: Qmp) -> None:
    """Refuse a save of a VM an earlier save left stopped (``postmigrate``: a memory snapshot
    of a paused box, or a client's pause during one). QEMU 7.2 refuses another migration then
    ("paused due to previous migration"), and only ``cont``, which runs the guest, makes it
    migratable again and reactivates its block devices (``blockdev-set-active`` is QEMU 10):
    boxvm never runs a guest a client paused, so the client resumes it first."""
    if await qmp.status() == "postmigrate":
        raise InvalidState(
            "the box is paused since a memory snapshot and QEMU cannot save its memory again until it runs: "
            "resume the box, then snapshot or suspend it"
        )


async def save(qmp: Qmp, box_dir: Path, shape: dict[str, Any]) -> dict[str, float]:
    """Stop the vCPUs and write the device state next to the RAM file (a suspend). A box
    whose RAM is private saves it with ``memory_live`` instead.

    The VM is left stopped (``postmigrate``) for the caller to quit. Timings in ms."""
    t0 = time.monotonic()
    await qmp.stop()
    t_stop = time.monotonic()
    faults.point("memory:stopped")
    (box_dir / META).unlink(missing_ok=True)  # the old record must not vouch for the new state
    tmp = await _write_state(qmp, box_dir)
    t_saved = time.monotonic()
    await asyncio.to_thread(_publish, box_dir, tmp, shape)
    return {
        "stop_ms": (t_stop - t0) * 1000,
        "save_ms": (t_saved - t_stop) * 1000,
        "sync_ms": (time.monotonic() - t_saved) * 1000,
    }


async def _write_state(qmp: Qmp, directory: Path) -> Path:
    """Migrate the stopped VM's device state (not the RAM: it is in its file) into a
    temporary file."""
    await check_savable(qmp)
    tmp = directory / f"{STATE}.tmp"
    tmp.unlink(missing_ok=True)
    await qmp.migrate_set_capabilities({"x-ignore-shared": True, "pause-before-switchover": False})
    state = StateFile(tmp)
    try:
        await qmp.migrate_to_fd(state.fd)
    finally:
        state.close()  # QEMU has its own copy
    await _wait_migration(qmp, incoming=False)
    return tmp


async def write_state_to(qmp: Qmp, dest: Path) -> float:
    """With the vCPUs already stopped: the device state into ``dest`` (a memory snapshot;
    the caller copies the RAM, resumes the VM, then calls :func:`seal`). Returns ms."""
    t0 = time.monotonic()
    await _write_state(qmp, dest)
    return (time.monotonic() - t0) * 1000


async def write_devices_to(qmp: Qmp, dest: Path, scratch_dir: Path) -> float:
    """With the vCPUs already stopped: the device state alone into ``dest`` (a memory
    snapshot of private RAM, whose pages the caller copies itself; ``QMP.save_devices``).
    Returns ms."""
    t0 = time.monotonic()
    tmp = dest / f"{STATE}.tmp"
    tmp.unlink(missing_ok=True)
    # QEMU opens it by its path: in the one directory of the box it may write in (a confined
    # QEMU writes nothing else there), then moved to where it belongs.
    scratch = scratch_dir / f"{STATE}.tmp"
    scratch.unlink(missing_ok=True)
    StateFile(scratch).close()  # new and 0600
    await qmp.save_devices(scratch)
    os.rename(scratch, tmp)
    return (time.monotonic() - t0) * 1000


def has_configuration(state: Path) -> bool:
    """Whether a saved device state begins with QEMU's configuration section (a migration's
    does; ``QMP.save_devices``' does not, and its loader must be told so). Unreadable: True
    (the default; the load then fails on its own)."""
    try:
        with open(state, "rb") as f:
            head = f.read(9)
    except OSError:
        return True
    return len(head) < 9 or head[8] == _QEMU_VM_CONFIGURATION


def adopt_ram(box_dir: Path, ram: Path, shape: dict[str, Any]) -> None:
    """A private RAM's suspend (``memory_ops._save_written``): ``ram`` becomes the box's own
    RAM file and the device state written beside it is sealed with it; the link to the
    template's or snapshot's RAM (``BASE``) goes last (QEMU's mapping of it stays valid)."""
    os.replace(ram, box_dir / RAM)
    seal(box_dir, shape, "file")
    (box_dir / BASE).unlink(missing_ok=True)


def seal(dest: Path, shape: dict[str, Any], ram: str = "file") -> None:
    """Make the memory state written to ``dest`` durable and vouch for it (outside the
    guest's pause): ``memory.state.tmp`` becomes ``memory.state``, the record is written last."""
    _publish(dest, dest / f"{STATE}.tmp", shape, ram)


def sweep(box_dir: Path, snapshot_ids: set[str]) -> None:
    """What a crashed memory snapshot of a box whose VM is down left: a capture no snapshot
    took, and memory snapshot files no snapshot record names (the files are renamed into
    place before the record is written)."""
    shutil.rmtree(box_dir / CAPTURE, ignore_errors=True)
    kept = box_dir / SNAPSHOTS
    for entry in kept.iterdir() if kept.is_dir() else ():
        if entry.name not in snapshot_ids:
            shutil.rmtree(entry, ignore_errors=True)


def copy_saved(box_dir: Path, dest: Path) -> None:
    """A suspended box's saved state as a new memory state at ``dest`` (a memory snapshot's
    capture): a RAM file of its own (the box's own RAM, written again by its resume, copied
    sparsely; a fork's read-only base hard-linked), the device state copied, the record
    (the same shape and fork mark) written last."""
    meta = read_meta(box_dir)
    mode = meta.get("ram", "file")
    fresh_dir(dest)
    if mode == "file":
        sparse_copy(box_dir / RAM, dest / RAM)
    elif mode == "base":
        os.link(box_dir / BASE, dest / RAM)
    shutil.copyfile(box_dir / STATE, dest / f"{STATE}.tmp")
    kept = {k: v for k, v in meta.items() if k not in ("version", "state_bytes", "state_sha256", "ram")}
    _publish(dest, dest / f"{STATE}.tmp", kept, "stream" if mode == "stream" else "file")


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy ``src`` to a new ``dst`` keeping its holes: only the data extents (SEEK_DATA /
    SEEK_HOLE) are copied, in the kernel (copy_file_range). Guest RAM is mostly holes.

    Written by hand because shutil.copyfile copies every byte, holes included, and this
    host's ext4 has no reflinks (which would make the copy O(1))."""
    total = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        os.fchmod(fout.fileno(), 0o600)
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            off_in, off_out = start, start
            while off_in < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - off_in, off_in, off_out)
                if n == 0:
                    break
                off_in += n
                off_out += n
            total += off_in - start
            pos = end
    return total


def read_through(path: Path) -> None:
    """Read ``path`` once, so that every page of it, holes included, is in the page cache.

    A fork maps ``BASE`` privately, and QEMU's save reads every page of that mapping: a
    page of a hole not yet cached is then a fault that zero-fills one page, 4-6 s for the
    holes of a 2 GiB guest, all with the guest stopped. One buffered read of the file
    fills the same pages in 0.3-0.8 s (cached: 0.15 s), and the faults then find them
    (0.04 s). ``POSIX_FADV_WILLNEED`` does not fill holes (measured: no faster)."""
    buf = bytearray(8 << 20)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EngineError(f"{path.name} is not a regular file")
        offset = 0
        while offset < st.st_size and (n := os.preadv(fd, [buf], offset)):
            offset += n
    finally:
        os.close(fd)


def _publish(box_dir: Path, tmp: Path, shape: dict[str, Any], ram: str = "file") -> None:
    """fsync the state and the RAM, rename the state into place, then write the record."""
    size, digest = _digest(tmp)
    if not size:
        raise EngineError("QEMU wrote an empty memory state")
    for path in (tmp, box_dir / RAM) if ram == "file" else (tmp,):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, box_dir / STATE)
    meta = {"version": 1, "state_bytes": size, "state_sha256": digest, "ram": ram, **shape}
    _write_durably(box_dir / META, json.dumps(meta).encode())


async def run_to_end(work: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None) -> T:
    """``work(*args)`` in a thread, awaited to its end even if the caller is cancelled
    meanwhile: work on a descriptor the caller closes next (a state file's, QEMU's memory).
    Cancelled, what it made is given to ``undo`` (an object holding a descriptor: closed)."""
    future = asyncio.ensure_future(asyncio.to_thread(work, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():  # a second cancel does not cut the wait short
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if undo is not None and not future.cancelled() and future.exception() is None:
            undo(future.result())
        raise


class StateFile:
    """A new state file (O_EXCL, 0600) whose descriptor QEMU's migration writes
    (``QMP.migrate_to_fd``), from offset 0 through the file offset it shares with ours."""

    _ZEROS = bytes(1 << 20)

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EngineError(f"could not create the memory state file: {exc.strerror or exc}") from exc

    def prefill(self, size: int) -> int:
        """Write ``size`` zero bytes (blocking; before the guest stops), so that QEMU,
        writing with the guest stopped, overwrites pages already in the page cache instead
        of having each allocated and reserved on disk as it goes (~180 MiB took ~65 ms
        into a new file here, ~40 ms over written pages). Only a speed-up: none when the
        filesystem has less than twice ``size`` free (it must not fill the disk for other
        writers), and it stops at the first failed write. Returns the bytes written."""
        st = os.fstatvfs(self.fd)
        if size * 2 > st.f_bavail * st.f_frsize:
            return 0
        done = 0
        with contextlib.suppress(OSError):  # ENOSPC, EFBIG, ...: QEMU's own writes will say
            while done < size:
                done += os.pwrite(self.fd, memoryview(self._ZEROS)[: size - done], done)
        return done

    def finish(self) -> int:
        """Cut the file where QEMU's stream ended (its migration completed: the shared
        offset), dropping what is left of a prefill; the stream's size."""
        end = os.lseek(self.fd, 0, os.SEEK_CUR)
        os.ftruncate(self.fd, end)
        return end

    def close(self) -> None:
        os.close(self.fd)


def _digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks (a ``stream`` state holds the RAM)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_meta(box_dir: Path) -> dict[str, Any]:
    """The record of a saved state (unchecked: :func:`check` vouches for it); {} if none."""
    try:
        meta = json.loads((box_dir / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def fork_into(src: Path, dest: Path) -> None:
    """Give ``dest`` (a new box's directory) the memory state in ``src`` (a memory snapshot's
    or a template's) as a fork's: the RAM file hard-linked as ``memory.base`` (O(1), shares
    the page cache; mapped share=off, never written), the state copied, and the record
    marked ``fork`` (the resumed guest is re-identified), written last."""
    meta = read_meta(src)
    ram = meta.get("ram", "file")
    if ram == "file":
        os.link(src / RAM, dest / BASE)
    elif ram != "stream":
        raise StorageError("this memory state cannot be forked (its RAM is not in a file or the state)")
    shutil.copyfile(src / STATE, dest / STATE)
    meta.update(ram="base" if ram == "file" else "stream", fork=True)
    _write_durably(dest / META, json.dumps(meta).encode())


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check(box_dir: Path, shape: dict[str, Any]) -> None:
    """Raise :class:`StorageError` unless the saved memory state is whole and belongs to a
    machine of this shape (memory size, cpus, guest bundle)."""
    try:
        meta = json.loads((box_dir / META).read_text())
        mode = meta.get("ram", "file") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("version") != 1 or mode not in ("file", "base", "stream"):
            raise StorageError("the saved memory state has an unknown format")
        size = (box_dir / STATE).stat().st_size
        ram = (box_dir / (BASE if mode == "base" else RAM)).stat().st_size if mode != "stream" else None
    except (OSError, ValueError) as exc:
        raise StorageError(f"the saved memory state is missing or unreadable ({type(exc).__name__})") from exc
    limit = MAX_STATE + (shape.get("memory_mib", 0) << 20 if mode == "stream" else 0)
    if size != meta.get("state_bytes") or size > limit:
        raise StorageError(f"the saved device state is {size} bytes, its record says {meta.get('state_bytes')}")
    if ram is not None and ram != shape.get("memory_mib", 0) << 20:
        raise StorageError("the saved RAM file does not have the box's memory size")
    for key, want in shape.items():
        if meta.get(key) != want:
            raise StorageError(f"the saved memory state was taken with {key}={meta.get(key)!r}, the box has {want!r}")
    if _digest(box_dir / STATE)[1] != meta.get("state_sha256"):
        raise StorageError("the saved device state does not match its checksum (damaged file)")


async def load(qmp: Qmp, box_dir: Path, with_ram: bool = False) -> float:
    """Load the device state (and the RAM if the state holds it: ``with_ram``) into a QEMU
    started with ``-incoming defer``; returns ms."""
    t0 = time.monotonic()
    # Both ends must agree: with x-ignore-shared the stream names the RAM blocks it skipped.
    await qmp.migrate_set_capabilities({"x-ignore-shared": not with_ram})
    await qmp.migrate_incoming_from(box_dir / STATE)
    await _wait_migration(qmp, incoming=True)
    return (time.monotonic() - t0) * 1000


def discard_state(box_dir: Path) -> None:
    """Forget a saved device state (the RAM file stays: it may be in use)."""
    for name in (META, f"{META}.tmp", STATE, f"{STATE}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (box_dir / name).unlink()


def discard(box_dir: Path) -> None:
    """Forget a box's memory state and RAM (a cold boot starts from fresh, empty RAM)."""
    discard_state(box_dir)
    for name in (RAM, BASE, f"{RAM}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (box_dir / name).unlink()


def fresh_dir(path: Path) -> None:
    """An empty private directory at ``path`` (what a crashed capture left is dropped)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)


def fresh_ram(box_dir: Path, memory_mib: int) -> None:
    """Replace any memory state with an empty (sparse) RAM file only its owner can read."""
    discard(box_dir)
    blank_ram(box_dir, memory_mib)


def blank_ram(box_dir: Path, memory_mib: int) -> None:
    """An empty RAM file, the saved state kept (a ``stream`` state is loaded into it)."""
    for name in (RAM, BASE):
        with contextlib.suppress(FileNotFoundError):
            (box_dir / name).unlink()
    fd = os.open(box_dir / RAM, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory_mib << 20)
    finally:
        os.close(fd)
