"""The ``memory.state`` archive member: a suspended box's RAM and device state as one stream.

Layout (version 1, integers little-endian)::

    header   64 bytes: b"BOXVMMEM", version u32, flags u32, ram_bytes u64,
             state_bytes u64, extents u64, 24 zero bytes
    state    state_bytes bytes: QEMU's migration stream (``engine/memory``'s ``memory.state``)
    table    extents x (offset u64, length u64): the RAM file's data extents, in order
    data     the extents' bytes, concatenated in table order

Flag ``STREAM`` (1): the RAM is inside the migration stream (a fork's private RAM, saved
by QEMU's plain migration); there is then no table and no data.

Only the RAM file's data extents are stored (found with SEEK_DATA/SEEK_HOLE, metadata
only), so the member's size is known before a byte is read and a guest's untouched memory
costs nothing; zero pages inside extents cost next to nothing once zstd-compressed with the
rest of the archive. The table precedes the data so a reader checks the whole map (order,
bounds, total) before it writes any RAM. The member's SHA-256 goes in the manifest.

A custom layout rather than two tar members: RAM and device state are only meaningful
together, and the extents table is what keeps a mostly empty RAM file small; tar's own
sparse formats are bounded here to a few holes (``archive.SPARSE_HOLES_LIMIT``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boxvm.errors import ArchiveError
from boxvm.streams import pread_views

MAGIC = b"BOXVMMEM"
VERSION = 1
MACHINE = "microvm"  # the machine type of every box (``engine/qemu.argv``'s ``-M``)
_HEADER = struct.Struct("<8sIIQQQ24x")
HEADER_BYTES = _HEADER.size
_EXTENT = struct.Struct("<QQ")
STREAM = 1  # flag: the RAM is in the migration stream
MAX_RAM = 65536 << 20  # BoxOptions allows up to 64 GiB of memory
MAX_STATE = 64 << 20  # device state is tens of KB (``engine.memory.MAX_STATE``)
PAGE = 4096
CHUNK = 1 << 20


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents of an open file (holes skipped), from the file system's map."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        pos = end
    return out


@dataclass(frozen=True)
class Plan:
    """What will be written for one RAM file and device state (read while they cannot change)."""

    state: Path
    state_bytes: int
    ram: Path | None  # None: the RAM is in the state (``STREAM``)
    ram_bytes: int
    extents: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        """The member's exact size: known before any RAM is read (a tar header needs it first)."""
        return HEADER_BYTES + self.state_bytes + _EXTENT.size * len(self.extents) + sum(n for _, n in self.extents)

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The member's bytes, in order (the files' as views of one reused buffer:
        ``streams.pread_views``); raises ArchiveError if a file changed meanwhile."""
        flags = STREAM if self.ram is None else 0
        yield _HEADER.pack(MAGIC, VERSION, flags, self.ram_bytes, self.state_bytes, len(self.extents))
        yield from _read(self.state, ((0, self.state_bytes),))
        table = b"".join(_EXTENT.pack(off, n) for off, n in self.extents)
        for at in range(0, len(table), CHUNK):
            yield table[at : at + CHUNK]
        if self.ram is not None:
            yield from _read(self.ram, self.extents)


def _read(path: Path, extents: Iterable[tuple[int, int]]) -> Iterator[memoryview]:
    buf = memoryview(bytearray(CHUNK))
    with open(path, "rb") as f:
        for off, length in extents:
            try:
                yield from pread_views(f.fileno(), off, length, buf)
            except EOFError:
                raise ArchiveError(f"{path.name} shrank while it was being exported") from None


def plan(state: Path, ram: Path | None, ram_bytes: int) -> Plan:
    """Plan the member of a saved memory state: ``state`` (QEMU's stream) and ``ram`` (the
    sparse RAM file; None when the stream holds the RAM) of a machine with ``ram_bytes``.
    The caller keeps both from changing until the member is written."""
    state_bytes = state.stat().st_size
    if not 0 < state_bytes <= MAX_STATE + (ram_bytes if ram is None else 0):
        raise ArchiveError(f"the saved state is {state_bytes} bytes: not a memory state this boxvm wrote")
    extents: list[tuple[int, int]] = []
    if ram is not None:
        with open(ram, "rb") as f:
            if os.fstat(f.fileno()).st_size != ram_bytes:
                raise ArchiveError("the saved RAM file does not have the box's memory size")
            extents = _extents(f.fileno(), ram_bytes)
    if not 0 < ram_bytes <= MAX_RAM or ram_bytes % PAGE:
        raise ArchiveError(f"a RAM of {ram_bytes} bytes: not a memory state this boxvm wrote")
    return Plan(state, state_bytes, ram, ram_bytes, tuple(extents))


@dataclass(frozen=True)
class Received:
    """A ``memory.state`` member written out as the files a box resumes from."""

    ram: Path | None  # sparse RAM file of ``ram_bytes``; None: the RAM is in the state (``STREAM``)
    state: Path  # the migration stream
    ram_bytes: int
    size: int  # the member's bytes
    checksum: str  # "sha256:<hex>" of the member's bytes


_ZERO_VIEW = memoryview(bytes(CHUNK))


class _Stream:
    """The member's bytes from ``source``, hashed and counted; never past ``size``."""

    def __init__(self, source: Iterator[bytes], size: int, label: str) -> None:
        self._source, self._left, self._label = source, size, label
        self._buffer = memoryview(b"")
        self.sha = hashlib.sha256()

    def take(self, n: int) -> Iterator[bytes | memoryview]:
        """The next ``n`` bytes, in chunks of at most CHUNK (views: no copies)."""
        if n > self._left:
            raise ArchiveError(f"{self._label}: memory.state is shorter than its header says (corrupt)")
        self._left -= n
        while n:
            if not self._buffer:
                self._buffer = memoryview(next(self._source, b""))
                if not self._buffer:
                    raise ArchiveError(f"{self._label}: memory.state is truncated")
            part, self._buffer = self._buffer[:n], self._buffer[n:]
            self.sha.update(part)
            n -= len(part)
            yield part

    def read(self, n: int) -> bytes:
        return b"".join(self.take(n))

    @property
    def left(self) -> int:
        return self._left


def receive(
    source: Iterable[bytes], size: int, work: Path, label: str, progress: Callable[[int], None] | None = None
) -> Received:
    """Write a ``memory.state`` member of ``size`` bytes from ``source`` into ``work`` as
    ``memory.ram`` (sparse) and ``memory.devstate``, checking its structure before anything
    is allocated; raises ArchiveError. The checksum is the caller's to compare."""
    stream = _Stream(iter(source), size, label)

    def bad(why: str) -> ArchiveError:
        return ArchiveError(f"{label}: memory.state is corrupt ({why}); nothing was imported")

    if size < HEADER_BYTES:
        raise bad(f"{size} bytes, shorter than its header")
    magic, version, flags, ram_bytes, state_bytes, count = _HEADER.unpack(stream.read(HEADER_BYTES))
    if magic != MAGIC:
        raise bad("not a boxvm memory state")
    if version > VERSION:
        raise ArchiveError(
            f"{label}: memory.state has format {version}; this boxvm reads up to {VERSION}: upgrade boxvm"
        )
    if version != VERSION or flags & ~STREAM:
        raise bad(f"format {version}, flags {flags}")
    if not 0 < ram_bytes <= MAX_RAM or ram_bytes % PAGE:
        raise bad(f"a RAM size of {ram_bytes} bytes")
    in_stream = bool(flags & STREAM)
    limit = MAX_STATE + (ram_bytes if in_stream else 0)  # a stream holding the RAM: at most the RAM more
    if not 0 < state_bytes <= limit:
        raise bad(f"a saved state of {state_bytes} bytes, over the limit of {limit}")
    if count > (0 if in_stream else ram_bytes // PAGE) or HEADER_BYTES + state_bytes + count * _EXTENT.size > size:
        raise bad(f"{count} RAM extents in a member of {size} bytes")
    state_path, ram_path = work / "memory.devstate", work / "memory.ram"
    _write_new(state_path, stream.take(state_bytes))
    if in_stream:
        if stream.left:
            raise bad(f"{stream.left} bytes after a state that holds the RAM")
        return Received(None, state_path, ram_bytes, size, f"sha256:{stream.sha.hexdigest()}")
    # The table, checked whole before any RAM is written: in order, inside the RAM, and
    # adding up to exactly the bytes that follow. It is kept in a file, not in memory (a
    # 64 GiB RAM may list 16 M extents: 256 MiB), and read back a chunk at a time.
    table_path = work / "memory.extents"
    pos = stored = 0
    with open(table_path, "xb+") as table:
        carry = b""  # an entry split across two chunks of the stream
        for chunk in stream.take(count * _EXTENT.size):
            data = carry + bytes(chunk)
            whole = len(data) - len(data) % _EXTENT.size
            for off, length in _EXTENT.iter_unpack(data[:whole]):
                if off < pos or length == 0 or off + length > ram_bytes:
                    raise bad("RAM extents out of order, empty or past the end of the RAM")
                pos, stored = off + length, stored + length
            table.write(data[:whole])
            carry = data[whole:]
        if stored != stream.left:
            raise bad(f"its extents hold {stored} bytes, the member has {stream.left} left")
        table.seek(0)
        fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, ram_bytes)  # sparse: no memory or disk is allocated for it
            done = 0
            while entries := table.read(CHUNK):
                for at, length in _EXTENT.iter_unpack(entries):
                    for chunk in stream.take(length):
                        if chunk != _ZERO_VIEW[: len(chunk)]:  # zero pages stay holes
                            os.pwrite(fd, chunk, at)
                        at += len(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done)
            os.fsync(fd)
        finally:
            os.close(fd)
    table_path.unlink()
    return Received(ram_path, state_path, ram_bytes, size, f"sha256:{stream.sha.hexdigest()}")


def _write_new(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for chunk in chunks:
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def require_fits(label: str, section: dict[str, object], want: dict[str, object]) -> None:
    """Refuse (ArchiveError) a memory state that the box being imported could not resume:
    another machine type, guest bundle (kernel), memory size or CPU count than ``want``."""
    advice = "import it where those match, or export the box again while it runs (its disk only)"
    if section.get("machine") != MACHINE:
        raise ArchiveError(
            f"{label}: its memory state is of a {section.get('machine')!r} machine, boxes here are {MACHINE}: {advice}"
        )
    for key, what in (("guest_bundle", "guest bundle"), ("memory_mib", "memory size (MiB)"), ("cpus", "CPU count")):
        if section.get(key) != want.get(key):
            raise ArchiveError(
                f"{label}: its memory state was saved with {what} {section.get(key)!r}, the imported box would have"
                f" {want.get(key)!r} (an untrusted import clamps memory and CPUs): {advice}"
            )
