"""The ``.boxsnap`` archive: writing it in one pass and reading it with full verification.

Writing: the container disk's chain is flattened by ``qcow2.flatten_plan`` (layout from
metadata, then data clusters in order), and those bytes go straight through SHA-256 into
a tar member inside a zstd stream, which the backend hands on as it is produced (to a file
through ``boxvm.publish``, or to a REST response): one pass, no intermediate copy.
``manifest.json`` comes last because it carries the checksum.

Reading trusts nothing: members are limited in name, type, count and size while they
stream (before the manifest is seen, since it comes last), checksums and sizes are
compared with the manifest, and the disk must be a standalone qcow2 whose tables stay
inside the file, judged by our reader and by ``qemu-img check``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import re
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from boxvm import faults, memarchive
from boxvm.disks import qcow2
from boxvm.errors import AlreadyExists, ArchiveError, InvalidArgument, StorageError
from boxvm.options import PATH_LIMIT, check_box_options
from boxvm.streams import BATCH

FORMAT = "boxvm-archive"
VERSION = 2  # 2: may carry memory.state (an archive without it is still written as 1)
DISK = "disk.qcow2"
GUEST_DISK = "guest-rootfs.qcow2"
MEMORY = "memory.state"
MANIFEST = "manifest.json"
MEMBERS = {DISK, MEMORY, MANIFEST}
UNUSED = {GUEST_DISK}  # names of the format this boxvm does not use: refused, never written
MANIFEST_LIMIT = 1 << 20
# the largest memory.state a box of the largest memory size can have (header, device state,
# one extent entry a page, the RAM)
MEMORY_LIMIT = (
    memarchive.HEADER_BYTES + memarchive.MAX_STATE + memarchive.MAX_RAM // memarchive.PAGE * 16 + memarchive.MAX_RAM
)
MAX_VIRTUAL = int(os.environ.get("BOXVM_IMPORT_MAX_VIRTUAL_BYTES", qcow2.MAX_VIRTUAL))
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Progress = Callable[[int], None]  # bytes done so far


def destination(dest: Path, box_name: str) -> Path:
    """Where an export goes: ``dest``, or ``<box>.boxsnap`` inside it if it is a directory;
    never over an existing file."""
    dest = Path(dest).expanduser().absolute()
    if dest.is_dir():
        dest = dest / f"{box_name}.boxsnap"
    if not dest.parent.is_dir():
        raise InvalidArgument(f"cannot export to {dest}: {dest.parent} is not a directory")
    if dest.exists():
        raise AlreadyExists(f"{dest} already exists: remove it or choose another destination")
    return dest


def write_failed(exc: OSError, dest: Path) -> StorageError:
    """The error for an archive that could not be written (nothing is left at ``dest``)."""
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on the device of {dest.parent}: the archive was not written")
    return StorageError(f"could not write {dest}: {exc.strerror or exc}")


def write_stream(
    top: Path,
    raw: IO[bytes],
    manifest: dict[str, Any],
    *,
    compress: bool,
    level: int,
    progress: Progress | None = None,
    memory: memarchive.Plan | None = None,
) -> dict[str, Any]:
    """Write the archive of ``top``'s chain to ``raw`` strictly in order (a file, a pipe or
    an HTTP response); returns the full manifest written last. With ``memory`` (a suspended
    box's saved state) a ``memory.state`` member follows the disk, and ``manifest["memory"]``
    must say what an importer has to match."""
    plan = qcow2.flatten_plan(top)
    out: IO[bytes] | _Compressing = _Compressing(raw, level) if compress else raw
    # Members are written by hand (header block, data, zero padding): tarfile's
    # stream writer re-slices its buffer on every write, which made export 5x
    # slower than hashing and compressing the same bytes.
    out.write(_info(DISK, plan.size).tobuf(format=tarfile.PAX_FORMAT))
    sha, count = hashlib.sha256(), 0
    for chunk in plan.chunks():
        sha.update(chunk)
        out.write(chunk)
        count += len(chunk)
        if progress is not None:
            progress(count)
    if count != plan.size:
        raise StorageError(f"the disk stream ended after {count} of {plan.size} bytes")
    faults.point("export:disk-streamed")
    out.write(b"\0" * (-count % tarfile.BLOCKSIZE))
    members = {DISK: plan.size}
    extra: dict[str, Any] = {}
    if memory is not None:
        members[MEMORY] = memory.size
        extra = {
            "memory": {**manifest["memory"], "format": memarchive.VERSION, "ram_bytes": memory.ram_bytes},
            "memory_state_checksum": _write_member(out, MEMORY, memory.size, memory.chunks()),
        }
    full = {
        **manifest,
        "format": FORMAT,
        "version": VERSION if memory is not None else 1,
        "container_disk_checksum": f"sha256:{sha.hexdigest()}",
        "guest_disk_checksum": "",
        "disk_virtual_size": plan.virtual_size,
        "disk_data_bytes": plan.data_bytes,
        "members": members,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    body = json.dumps(full, indent=2, sort_keys=True).encode()
    out.write(_info(MANIFEST, len(body)).tobuf(format=tarfile.PAX_FORMAT))
    out.write(body + b"\0" * (-len(body) % tarfile.BLOCKSIZE))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
    if isinstance(out, _Compressing):
        out.finish()
    raw.flush()
    return full


class _Compressing:
    """One zstd frame, written to ``raw`` in whole pieces of ``streams.BATCH`` bytes, each a
    new ``bytes`` copied once from zstd's output buffer: the archive's readers (``streams.ThreadWriter``, then a
    file, an HTTP response or an S3 part) take those bytes as they are, where a
    ``stream_writer``'s ~128 KiB writes were copied twice more on their way to a sink.
    Multithreaded, with 2 MiB jobs: the default job size made the compressor hold ~60 MB
    (measured) for no gain in speed here. At the fast levels (≤ 3) a job does not reload
    the end of the one before (``overlap_log=1``): the default 256 KiB cost 11 % of the
    level-3 compressor's CPU on the S3 bench's disk, for archives 0.15 % smaller. Higher
    levels keep zstd's overlap, up to the whole window, where more of their ratio lies."""

    def __init__(self, raw: IO[bytes], level: int) -> None:
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=-1, job_size=2 << 20, overlap_log=1 if level <= 3 else 0
        )
        self._chunker = zstandard.ZstdCompressor(compression_params=params).chunker(chunk_size=BATCH)
        self._raw = raw

    def write(self, data: bytes | memoryview) -> int:
        for piece in self._chunker.compress(data):
            self._raw.write(piece)
        return len(data)

    def finish(self) -> None:
        """End the frame (the rest of the compressed bytes and its epilogue)."""
        for piece in self._chunker.finish():
            self._raw.write(piece)


def _write_member(out: IO[bytes] | _Compressing, name: str, size: int, chunks: Iterator[bytes | memoryview]) -> str:
    """One member of exactly ``size`` bytes (header, data, padding); returns its checksum."""
    out.write(_info(name, size).tobuf(format=tarfile.PAX_FORMAT))
    sha, count = hashlib.sha256(), 0
    for chunk in chunks:
        sha.update(chunk)
        out.write(chunk)
        count += len(chunk)
    if count != size:
        raise StorageError(f"the {name} stream has {count} bytes, not the {size} planned")
    out.write(b"\0" * (-count % tarfile.BLOCKSIZE))
    return f"sha256:{sha.hexdigest()}"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(datetime.datetime.now(datetime.UTC).timestamp())
    return info


@dataclass(frozen=True)
class VerifiedArchive:
    manifest: dict[str, Any]
    disk: Path  # the verified standalone container disk, in the staging directory
    memory: memarchive.Received | None = None  # a suspended box's memory state, checksum verified


# -- a bounded tar reader --------------------------------------------------------------
# Written by hand rather than with tarfile: tarfile reads pax, GNU long-name and sparse
# headers whole into memory before any check (a 32 KB archive reached 2 GiB), and its
# bounded use needs its private hooks. An archive needs little of tar: regular members,
# pax or GNU long-name headers (bounded), and GNU old-style sparse members, which the
# real BoxLite writes for its disk (their map is bounded in entries and holes).
BLOCK = 512
EXTENSION_LIMIT = 64 << 10  # bytes of one pax or GNU long-name header
EXTENSION_HEADERS = 8  # extension headers in one archive
SPARSE_ENTRIES = 1 << 12  # entries of one GNU sparse map (BoxLite's disks have a handful)
SPARSE_HOLES_LIMIT = 1 << 30  # bytes of holes in one sparse member (hashed as zeros)
_REGULAR = (b"0", b"\0", b"7")
_OCTAL = re.compile(rb"[0-7]*")
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,8}) ")


@dataclass(frozen=True)
class Member:
    name: str
    regular: bool  # a regular file (or a GNU sparse one); anything else is refused by the caller
    size: int  # bytes stored in the archive
    real_size: int  # bytes of the file: larger than ``size`` when sparse
    segments: tuple[tuple[int, int], ...]  # (offset, length) of the stored data in the file


class TarReader:
    """Members of a tar stream, each header bounded before it is read."""

    def __init__(self, stream: IO[bytes], label: str) -> None:
        self._stream = stream
        self._label = label
        self._left = 0  # unread data bytes of the current member
        self._extensions = 0

    def _corrupt(self, why: str) -> ArchiveError:
        return ArchiveError(f"{self._label} is truncated or corrupt ({why}); nothing was imported")

    def _read(self, n: int) -> bytes:
        parts, want = [], n
        while want:
            got = self._stream.read(want)
            if not got:
                raise self._corrupt("unexpected end of data")
            parts.append(got)
            want -= len(got)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n:
            n -= len(self._read(min(n, 1 << 20)))

    def data(self, count: int | None = None) -> Iterator[bytes]:
        """The current member's next ``count`` stored bytes (all of them by default), in chunks."""
        count = self._left if count is None else count
        if count > self._left:
            raise self._corrupt("a sparse map larger than its member")
        while count:
            chunk = self._read(min(count, 1 << 20))
            self._left -= len(chunk)
            count -= len(chunk)
            yield chunk

    def members(self) -> Iterator[Member]:
        """Each member in turn; its data must be read with ``data`` before the next one."""
        pax: dict[str, str] = {}
        long_name: bytes | None = None
        padding = 0
        while True:
            self._skip(self._left + padding)
            self._left = padding = 0
            block = self._read(BLOCK)
            if block == bytes(BLOCK):
                return  # end of archive
            self._check_sum(block)
            kind, size = block[156:157], self._number(block[124:136])
            if kind in (b"x", b"g", b"L", b"K"):
                self._extensions += 1
                if size > EXTENSION_LIMIT or self._extensions > EXTENSION_HEADERS:
                    raise ArchiveError(
                        f"{self._label}: a tar extension header of {size} bytes (or more than "
                        f"{EXTENSION_HEADERS} of them): over the limit of {EXTENSION_LIMIT} bytes"
                    )
                body = self._read(size + (-size % BLOCK))[:size]
                if kind == b"x":
                    pax = self._pax(body)
                elif kind == b"g" and self._pax(body).keys() & {"path", "size"}:
                    raise self._corrupt("a global pax header sets a path or size")
                elif kind == b"L":
                    long_name = body.split(b"\0", 1)[0]
                continue
            name = long_name if long_name is not None else self._name(block)
            try:
                text = pax["path"] if "path" in pax else name.decode()
            except UnicodeDecodeError:
                raise self._corrupt("a member name is not UTF-8") from None
            if "size" in pax:
                if not pax["size"].isascii() or not pax["size"].isdigit() or len(pax["size"]) > 20:
                    raise self._corrupt("a bad pax size")
                size = int(pax["size"])
            pax, long_name = {}, None
            real_size, segments = size, ((0, size),)
            if kind == b"S":
                real_size, segments = self._sparse(block, size)
            self._left, padding = size, -size % BLOCK
            yield Member(text, kind in _REGULAR or kind == b"S", size, real_size, segments)

    def _check_sum(self, block: bytes) -> None:
        field = block[148:156].strip(b" \0")
        if not field or not _OCTAL.fullmatch(field):
            raise self._corrupt("a tar header without a checksum")
        if int(field, 8) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise self._corrupt("a tar header checksum does not match")

    def _number(self, field: bytes) -> int:
        if field[:1] == b"\x80":  # GNU base-256 (sizes of 8 GiB and more)
            return int.from_bytes(field[1:], "big")
        digits = field.strip(b" \0")
        if not _OCTAL.fullmatch(digits):
            raise self._corrupt("a bad number in a tar header")
        return int(digits or b"0", 8)

    @staticmethod
    def _name(block: bytes) -> bytes:
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix (GNU keeps other fields there)
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                return prefix + b"/" + name
        return name

    def _pax(self, body: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        pos = 0
        while pos < len(body):
            m = _PAX_RECORD.match(body, pos)
            end = pos + int(m.group(1)) if m else 0
            if not m or end > len(body) or body[end - 1 : end] != b"\n" or b"=" not in body[m.end() : end]:
                raise self._corrupt("a malformed pax header")
            key, value = body[m.end() : end - 1].split(b"=", 1)
            try:
                out[key.decode()] = value.decode()
            except UnicodeDecodeError:
                raise self._corrupt("a pax header is not UTF-8") from None
            pos = end
        if any(k.startswith("GNU.sparse.") for k in out):
            raise ArchiveError(f"{self._label}: pax sparse members are not supported")
        return out

    def _sparse(self, block: bytes, size: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """A GNU old-style sparse map: four entries in the header, 21 per extension block."""
        real_size = self._number(block[483:495])
        entries = self._entries(block[386:482])
        extended = block[482]
        while extended:
            if len(entries) > SPARSE_ENTRIES:
                raise ArchiveError(f"{self._label}: a sparse map of more than {SPARSE_ENTRIES} entries")
            ext = self._read(BLOCK)
            entries += self._entries(ext[:504])
            extended = ext[504]
        pos = stored = 0
        for offset, length in entries:
            if offset < pos or offset + length > real_size:
                raise self._corrupt("a sparse map out of order or past the end of its file")
            pos, stored = offset + length, stored + length
        if stored != size or len(entries) > SPARSE_ENTRIES:
            raise self._corrupt("a sparse map that does not match its member")
        if real_size - size > SPARSE_HOLES_LIMIT:
            raise ArchiveError(f"{self._label}: a sparse member with over {SPARSE_HOLES_LIMIT} bytes of holes")
        return real_size, tuple(entries)

    def _entries(self, area: bytes) -> list[tuple[int, int]]:
        out = []
        for at in range(0, len(area), 24):
            if area[at] == 0:
                break
            out.append((self._number(area[at : at + 12]), self._number(area[at + 12 : at + 24])))
        return out


def _open_stream(raw: Any) -> IO[bytes]:
    if raw.peek(4)[:4] == ZSTD_MAGIC:  # a buffered file or a ThreadReader: both can peek
        import zstandard

        # 1 MiB input reads: ~10% less CPU in the decompressing thread than the default
        # 128 KiB, and whole chunks of a read-ahead reader are taken without a copy
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20, read_across_frames=True)
        return reader  # type: ignore[return-value]
    return raw


def read_archive(
    archive: Path | IO[bytes], work: Path, max_disk_bytes: int, progress: Progress | None = None, label: str = ""
) -> VerifiedArchive:
    """Stream ``archive`` (a file, or a stream such as an upload) into ``work`` and verify
    everything; raises ArchiveError. ``label`` names it in messages."""
    import zstandard

    if isinstance(archive, Path):
        with archive.open("rb") as raw:
            return read_archive(raw, work, max_disk_bytes, progress, label or archive.name)
    label = label or "the archive"
    seen: dict[str, tuple[int, str]] = {}
    manifest_bytes = b""
    memory: memarchive.Received | None = None
    try:
        tar = TarReader(_open_stream(archive), label)
        for member in tar.members():
            name = member.name
            if name in UNUSED:
                raise ArchiveError(
                    f"{label}: member {name!r} (a guest root disk) is not supported by this boxvm; "
                    "export the box again without it"
                )
            if name not in MEMBERS:
                raise ArchiveError(f"{label}: unexpected member {name!r} (absolute, '..' or unknown)")
            if name in seen:
                raise ArchiveError(f"{label}: duplicate member {name!r}")
            if not member.regular:
                raise ArchiveError(f"{label}: member {name!r} is a link, device or directory")
            limit = {MANIFEST: MANIFEST_LIMIT, MEMORY: min(max_disk_bytes, MEMORY_LIMIT)}.get(name, max_disk_bytes)
            if member.real_size > limit:
                raise ArchiveError(f"{label}: {name} declares {member.real_size} bytes, over the limit of {limit}")
            if name == MANIFEST:
                manifest_bytes = b"".join(tar.data())
                seen[name] = (len(manifest_bytes), "")
            elif name == MEMORY:
                if member.real_size != member.size:
                    raise ArchiveError(f"{label}: {MEMORY} is a sparse tar member (this boxvm writes a plain one)")
                memory = memarchive.receive(tar.data(), member.size, work, label)
                seen[name] = (memory.size, memory.checksum)
            else:
                seen[name] = _receive_disk(tar, member, work / name, label, progress)
    except (zstandard.ZstdError, EOFError) as exc:
        raise ArchiveError(f"{label} is truncated or corrupt ({exc}); nothing was imported") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError("no space left while importing: free some space; nothing was imported") from exc
        raise ArchiveError(f"{label} could not be read: {exc.strerror or exc}") from exc
    manifest = _check_manifest(label, manifest_bytes, seen)
    if memory is not None and manifest["memory"]["memory_mib"] << 20 != memory.ram_bytes:
        raise ArchiveError(f"{label}: {MEMORY} holds {memory.ram_bytes} bytes of RAM, not the manifest's memory size")
    disk = work / DISK
    try:
        with _synced(disk):
            _check_disk(label, disk, manifest)
    except OSError as exc:
        raise _write_error(exc) from exc
    return VerifiedArchive(manifest, disk, memory)


def _write_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError("no space left while importing: free some space; nothing was imported")
    return StorageError(f"could not write the imported disk: {exc.strerror or exc}; nothing was imported")


_ZEROS = bytes(1 << 20)


def _receive_disk(tar: TarReader, member: Member, path: Path, label: str, progress: Progress | None) -> tuple[int, str]:
    """Write the disk member (its sparse map's holes, and all-zero MiB, stay holes) and hash
    it as its expanded bytes. Once the qcow2 header has arrived, a member larger than a
    qcow2 of that virtual size can be is refused before the rest is read. Not yet durable:
    ``read_archive`` syncs it beside the checks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        digest = _write_disk(tar, member, fd, label, progress)
        os.ftruncate(fd, member.real_size)
    finally:
        os.close(fd)
    return member.real_size, f"sha256:{digest}"


def _write_disk(tar: TarReader, member: Member, fd: int, label: str, progress: Progress | None) -> str:
    sink = _DiskSink(fd)
    try:
        pos, head = 0, bytearray(qcow2.CLUSTER)  # the file's first cluster, holes as zeros
        judged = False
        for offset, length in member.segments:
            sink.zeros(offset - pos)
            pos = offset
            for chunk in tar.data(length):
                if pos < qcow2.CLUSTER:
                    n = min(len(chunk), qcow2.CLUSTER - pos)
                    head[pos : pos + n] = chunk[:n]
                sink.put(pos, chunk)
                pos += len(chunk)
                if not judged and pos >= qcow2.CLUSTER:
                    judged = True
                    _judge_header(label, bytes(head), member.real_size)
                if progress is not None:
                    progress(pos)
        sink.zeros(member.real_size - pos)
        return sink.finish()
    finally:
        sink.close()


class _DiskSink:
    """SHA-256 and the writes of the disk, each in a thread of its own, while the caller's
    thread parses the tar and decompresses: all three release the GIL, so on two cores they
    overlap instead of adding up (decompression bounds a compressible disk, the hash an
    incompressible one). Every byte is still hashed, in order. Each stage holds at most
    ``_DEPTH`` chunks (1 MiB each, shared by both), so memory stays bounded whatever the
    archive. A failure in a stage (ENOSPC) is raised by the caller's next ``put`` or by
    ``finish``."""

    _DEPTH = 8

    def __init__(self, fd: int) -> None:
        self._h = hashlib.sha256()
        with contextlib.ExitStack() as undo:  # a part that fails to start stops those before it
            self._file = _DiskWriter(fd)
            undo.callback(self._file.close)
            self._hash = _Stage(self._h.update, self._DEPTH, "boxvm-import-sha256")
            undo.callback(self._hash.close)
            self._write = _Stage(self._write_chunk, self._DEPTH, "boxvm-import-write")
            undo.pop_all()

    def _write_chunk(self, item: tuple[int, bytes] | None) -> None:
        """Write a chunk, or (``None``, the last item) what is still pending."""
        try:
            if item is None:
                self._file.flush()
            elif item[1] != _ZEROS:  # all zeros: a hole
                self._file.write(*item)
        except OSError as exc:
            raise _write_error(exc) from exc

    def put(self, offset: int, chunk: bytes) -> None:
        """Hash ``chunk`` and write it at ``offset`` (unless all zeros)."""
        self._hash.put(chunk)
        self._write.put((offset, chunk))

    def zeros(self, count: int) -> None:
        """Hash ``count`` zero bytes (a hole: nothing written)."""
        while count > 0:
            n = min(count, len(_ZEROS))
            self._hash.put(memoryview(_ZEROS)[:n])
            count -= n

    def finish(self) -> str:
        """The digest, once everything queued is hashed and written."""
        self._write.put(None)
        self._write.finish()
        self._hash.finish()
        return self._h.hexdigest()

    def close(self) -> None:
        """Stop both threads (after what is queued) and the writer; idempotent."""
        try:
            self._write.close()
            self._hash.close()
        finally:
            self._file.close()


class _DiskWriter:
    """The imported disk's bytes into its file. Runs of whole 4 KiB blocks go with O_DIRECT
    through one reused, page-aligned bounce buffer, up to ``_RUN`` bytes a write (one call
    the device splits into concurrent requests); anything else, or a file system that takes
    no direct I/O (tmpfs before Linux 6.6), is written through the page cache with writeback started every
    ``_WRITEBACK`` bytes. Why: a buffered write copies every byte into newly allocated page
    cache, which was half of an import's CPU here (a VM whose host reclaims the guest's free
    memory, so that memory faults in again on first touch), leaves it to be written back
    later, and evicts pages other boxes use for a disk that is read again only as the box
    needs it. No direct run and no buffered write share a 4 KiB block; where they share a
    larger page, the kernel writes the cached page back and drops it before the direct
    write. The fsync that follows makes both durable."""

    _ALIGN = 4096  # the largest logical block size in use: aligned for any device
    _RUN = 4 << 20
    _WRITEBACK = 32 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._direct = _reopen_direct(fd)
        self._bounce: mmap.mmap | None = None
        if self._direct is not None:
            try:
                self._bounce = mmap.mmap(-1, self._RUN)
            except OSError:  # no memory for it: buffered writes
                self.close()
        self._start = self._fill = 0  # the pending direct run: its file offset and length
        self._synced = self._written = 0  # buffered bytes [synced, written) not yet handed to writeback

    def write(self, offset: int, chunk: bytes) -> None:
        n = len(chunk)
        if self._fill and (offset != self._start + self._fill or self._fill + n > self._RUN):
            self.flush()  # it does not extend the pending run
        if self._bounce is None or offset % self._ALIGN or n % self._ALIGN or n > self._RUN:
            self.flush()
            self._buffered(offset, chunk)
            return
        if not self._fill:
            self._start = offset
        self._bounce[self._fill : self._fill + n] = chunk
        self._fill += n

    def flush(self) -> None:
        """Write the pending direct run."""
        if not self._fill or self._bounce is None or self._direct is None:
            return
        refused = False
        with memoryview(self._bounce) as bounce, bounce[: self._fill] as run:
            try:
                done = os.pwrite(self._direct, run, self._start)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                done, refused = 0, True  # another alignment, or no direct writes after all
            # the rest as a copy: a failing write's traceback must not pin the buffer
            rest = bytes(run[done:])
        start, self._fill = self._start + done, 0
        if refused:
            self.close()  # buffered from now on
        if rest:  # short (a full disk says so on the buffered write) or refused
            self._buffered(start, rest)

    def _buffered(self, offset: int, data: bytes | memoryview) -> None:
        _pwrite_all(self._fd, data, offset)
        self._written = max(self._written, offset + len(data))
        if self._written - self._synced >= self._WRITEBACK:
            _start_writeback(self._fd, self._synced, self._written - self._synced)
            self._synced = self._written

    def close(self) -> None:
        """Direct writes end here: the descriptor and the buffer go (a pending run is not
        written); idempotent."""
        self._fill = 0
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        if self._bounce is not None:
            with contextlib.suppress(BufferError):  # a view still held: freed with the last one
                self._bounce.close()
            self._bounce = None


def _reopen_direct(fd: int) -> int | None:
    """A second descriptor of ``fd``'s file with ``fd``'s access mode, for direct writes;
    None where the file system refuses O_DIRECT."""
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    try:
        return os.open(f"/proc/self/fd/{fd}", mode | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


class _Stage:
    """``work(item)`` for each item put, in order, in a thread of its own, with at most
    ``depth`` items waiting. After a failure it keeps draining (so a caller is never left
    blocked on a full queue) and the failure is raised by the next ``put`` or ``finish``."""

    def __init__(self, work: Callable[[Any], None], depth: int, name: str) -> None:
        self._work = work
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[Any] | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._work(item[0])
                except BaseException as exc:
                    self._error = exc

    def put(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((item,))

    def finish(self) -> None:
        self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, off, len, SYNC_FILE_RANGE_WRITE)``: start writeback of a range
    without waiting (the os module has no binding). None where libc lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, count: call(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """A hint only: durability comes from the fsync that follows (its errors too)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, count)


@contextlib.contextmanager
def _synced(path: Path) -> Iterator[None]:
    """fsync ``path`` in a thread while the body runs (the checks read the page cache, they
    do not need the data on disk): the body's error wins, else the fsync's is raised."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    errors: list[OSError] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=sync, name="boxvm-import-fsync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
        os.close(fd)
    if errors:
        raise errors[0]


def _judge_header(label: str, head: bytes, size: int) -> None:
    """Refuse a disk member whose qcow2 header (``head``: its first cluster) already shows
    it cannot be what it claims."""
    if head[:4] != qcow2.MAGIC or len(head) < 72:
        raise ArchiveError(f"{label}: {DISK} is not a qcow2 image")
    virtual = int.from_bytes(head[24:32], "big")
    if virtual > MAX_VIRTUAL:
        raise ArchiveError(
            f"{label}: {DISK} has a virtual size of {virtual} bytes, over the limit of {MAX_VIRTUAL} "
            "(BOXVM_IMPORT_MAX_VIRTUAL_BYTES)"
        )
    if size > qcow2.max_file_size(virtual):
        raise ArchiveError(f"{label}: {DISK} is {size} bytes, more than a qcow2 of {virtual} virtual bytes can hold")


def _check_manifest(label: str, body: bytes, seen: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """The manifest, every field checked for type and bounds, as a new dict of known fields
    only: nothing from it is committed unless it passed here."""
    if not body:
        raise ArchiveError(f"{label} has no manifest.json: it is not a boxvm or BoxLite archive")
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{label}: manifest.json is not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(manifest, dict):
        raise ArchiveError(f"{label}: manifest.json is not a JSON object")
    if "format" not in manifest and isinstance(manifest.get("image"), str):
        return _boxlite_manifest(label, manifest, seen)
    if manifest.get("format") != FORMAT:
        raise ArchiveError(f"{label}: manifest.json is not a {FORMAT} manifest")
    version = manifest.get("version")
    if not _is_int(version):
        raise ArchiveError(f"{label}: manifest version must be an integer")
    if version > VERSION:
        raise ArchiveError(f"{label} has archive version {version}; this boxvm reads up to {VERSION}: upgrade boxvm")
    members = manifest.get("members")
    checksum = manifest.get("container_disk_checksum")
    if not isinstance(members, dict) or not isinstance(checksum, str):
        raise ArchiveError(f"{label}: manifest lacks members or container_disk_checksum")
    if DISK not in seen:
        raise ArchiveError(f"{label} has no {DISK}")
    for name in seen.keys() - {MANIFEST}:
        if members.get(name) != seen[name][0]:
            raise ArchiveError(
                f"{label}: {name} has {seen[name][0]} bytes, the manifest says {members.get(name)!r:.64}"
            )
    if set(members) - set(seen):
        raise ArchiveError(f"{label}: members {sorted(set(members) - set(seen))[:4]} are missing")
    if checksum != seen[DISK][1]:
        raise ArchiveError(f"{label}: {DISK} does not match its checksum (corrupt or altered)")
    size = manifest.get("disk_virtual_size")
    if not _is_int(size) or not 0 < size <= MAX_VIRTUAL:
        raise ArchiveError(f"{label}: manifest lacks disk_virtual_size, or it is not 1..{MAX_VIRTUAL} bytes")
    out = {
        **_common(label, manifest),
        "format": FORMAT,
        "version": version,
        "container_disk_checksum": checksum,
        "disk_virtual_size": size,
        "members": {name: seen[name][0] for name in seen.keys() - {MANIFEST}},
    }
    if MEMORY in seen:
        out.update(_check_memory(label, manifest, seen[MEMORY][1]))
    return out


def _check_memory(label: str, manifest: dict[str, Any], checksum: str) -> dict[str, Any]:
    """The manifest's description of its memory state, checked, and the member's checksum."""
    if manifest.get("memory_state_checksum") != checksum:
        raise ArchiveError(f"{label}: {MEMORY} does not match its checksum (corrupt or altered)")
    section = manifest.get("memory")
    if not isinstance(section, dict):
        raise ArchiveError(f"{label}: the manifest does not describe its {MEMORY} (no 'memory' object)")
    fmt, machine, qemu_version = section.get("format"), section.get("machine"), section.get("qemu_version")
    mib, cpus, bundle = section.get("memory_mib"), section.get("cpus"), section.get("guest_bundle")
    if not _is_int(fmt) or fmt < 1:
        raise ArchiveError(f"{label}: the manifest's memory format must be a positive integer")
    if fmt > memarchive.VERSION:
        raise ArchiveError(
            f"{label}: its memory state has format {fmt}; this boxvm reads up to {memarchive.VERSION}: upgrade boxvm"
        )
    if not (isinstance(machine, str) and _BUNDLE.fullmatch(machine)):
        raise ArchiveError(f"{label}: the manifest's memory machine type must be a short name")
    if not (_is_int(mib) and 128 <= mib <= memarchive.MAX_RAM >> 20) or not (_is_int(cpus) and 1 <= cpus <= 64):
        raise ArchiveError(f"{label}: the manifest's memory_mib or cpus of the memory state is missing or out of range")
    if not (isinstance(bundle, str) and _BUNDLE.fullmatch(bundle)):
        raise ArchiveError(f"{label}: the manifest's memory state names no valid guest bundle")
    if qemu_version is not None and not (isinstance(qemu_version, str) and _BUNDLE.fullmatch(qemu_version)):
        raise ArchiveError(f"{label}: the manifest's qemu_version must be a short version string")
    checked = {"format": fmt, "machine": machine, "memory_mib": mib, "cpus": cpus, "guest_bundle": bundle}
    if qemu_version is not None:
        checked["qemu_version"] = qemu_version
    return {"memory": checked, "memory_state_checksum": checksum}


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BUNDLE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _common(label: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields both formats share, checked: names, image, digest, bundle, box options."""
    name, image = manifest.get("box_name"), manifest.get("image")
    digest, bundle = manifest.get("image_digest"), manifest.get("guest_bundle")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= 256 and name.isprintable()):
        raise ArchiveError(f"{label}: box_name must be a printable string of at most 256 characters")
    if image is not None and not (isinstance(image, str) and 0 < len(image) <= PATH_LIMIT and image.isprintable()):
        raise ArchiveError(f"{label}: image must be a printable string of at most {PATH_LIMIT} characters")
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise ArchiveError(f"{label}: image_digest must be 'sha256:' and 64 hex digits")
    if bundle is not None and not (isinstance(bundle, str) and _BUNDLE.fullmatch(bundle)):
        raise ArchiveError(f"{label}: guest_bundle must be 1-128 letters, digits, '.', '_' or '-'")
    out: dict[str, Any] = {"box_name": name, "image": image, "image_digest": digest, "guest_bundle": bundle}
    if manifest.get("box_options") is not None:
        try:
            out["box_options"] = check_box_options(manifest["box_options"])
        except InvalidArgument as exc:
            raise ArchiveError(f"{label}: the archive's box options are invalid: {exc.message}") from exc
    return out


BOXLITE_VERSIONS = range(1, 6)


def _boxlite_manifest(label: str, manifest: dict[str, Any], seen: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """Normalise a BoxLite manifest (versions 1-5: no format field, checksums from v2,
    box options from v3) into ours, verifying what it carries."""
    version = manifest.get("version")
    if not _is_int(version) or version not in BOXLITE_VERSIONS:
        raise ArchiveError(f"{label}: BoxLite archive version {version!r:.32} is not supported (1-5 are)")
    if DISK not in seen:
        raise ArchiveError(f"{label} has no {DISK}")
    checksum = manifest.get("container_disk_checksum")
    if MEMORY in seen:
        raise ArchiveError(f"{label}: a BoxLite archive with {MEMORY}: BoxLite archives carry no memory state")
    if version >= 2 and (not isinstance(checksum, str) or checksum != seen[DISK][1]):
        raise ArchiveError(f"{label}: {DISK} does not match its checksum (corrupt or altered)")
    raw = manifest.get("box_options")
    if raw is not None and not isinstance(raw, dict):
        raise ArchiveError(f"{label}: the archive's box options are invalid: not a JSON object")
    options: dict[str, Any] = {}
    # only what means the same here; the rest is BoxLite's own
    for theirs, ours in (("cpus", "cpus"), ("memory_mib", "memory_mib"), ("working_dir", "workdir"), ("user", "user")):
        if raw and raw.get(theirs) is not None:
            options[ours] = raw[theirs]
    common = _common(label, {"box_name": manifest.get("box_name"), "image": manifest["image"], "box_options": options})
    return {
        **common,
        "format": "boxlite-archive",
        "version": version,
        "container_disk_checksum": checksum if version >= 2 else "",
        "disk_virtual_size": None,  # taken from the verified disk
        "members": {DISK: seen[DISK][0]},
    }


QEMU_IMG_MEMORY = 1 << 30  # address space for qemu-img check of an untrusted image
QEMU_IMG_TIMEOUT = 120  # seconds


def _check_disk(label: str, disk: Path, manifest: dict[str, Any]) -> None:
    try:
        header = qcow2.read_header(disk)
        if header.backing_file is not None:
            raise ValueError("it references a backing file, which could read host files")
        if header.data_file is not None or header.incompatible_features & qcow2.INCOMPAT_DATA_FILE:
            raise ValueError("it uses an external data file")
        if manifest["disk_virtual_size"] is None:  # BoxLite manifests do not record it
            manifest["disk_virtual_size"] = header.size
        elif header.size != manifest["disk_virtual_size"]:
            raise ValueError("its virtual size differs from the manifest")
        if header.size > MAX_VIRTUAL:
            raise ValueError(f"its virtual size is over the limit of {MAX_VIRTUAL} bytes")
        if header.refcount_table_offset + header.refcount_table_clusters * qcow2.CLUSTER > disk.stat().st_size:
            raise ValueError("its refcount table points past the end of the file")
        qcow2.check(disk, MAX_VIRTUAL)  # every table and data offset inside the file, none used twice
    except (ValueError, OSError) as exc:
        raise ArchiveError(f"{label}: {DISK} is unsafe or malformed: {exc}") from exc
    # qemu-img, the reference reader, judges it too: under a memory and time limit
    problems = _qemu_img_check(label, disk)
    if problems and all(line.startswith(COPIED_FLAG_ERROR) for line in problems):
        # BoxLite's writer leaves the COPIED flag unset on clusters whose refcount is 1 (all
        # of them: our walk above refused any cluster used twice). The image reads correctly;
        # qemu-img sets the flags from the refcounts on this private copy; after a repair it
        # checks the image again itself ("Double checking the fixed image") and its exit
        # status is that second check's.
        problems = _qemu_img_check(label, disk, repair=True)
    if problems:
        why = "; ".join(problems[:3]).replace(str(disk), DISK)[:500]
        raise ArchiveError(f"{label}: qemu-img check rejects {DISK}: {why}")


COPIED_FLAG_ERROR = "ERROR OFLAG_COPIED "


def _qemu_img_check(label: str, disk: Path, *, repair: bool = False) -> list[str]:
    """The problems ``qemu-img check`` reports (``repair``: after ``-r all``); [] if none."""
    argv = ["prlimit", f"--as={QEMU_IMG_MEMORY}", "qemu-img", "check", "-q", "-f", "qcow2", str(disk)]
    if repair:
        argv[4:4] = ["-r", "all"]
    try:
        check = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ArchiveError(f"{label}: qemu-img check of {DISK} took over {QEMU_IMG_TIMEOUT} s") from exc
    if check.returncode == 0:
        return []
    return (check.stdout + check.stderr).strip().splitlines() or [f"exit code {check.returncode}"]
