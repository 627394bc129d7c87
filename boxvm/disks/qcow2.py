"""The one module that touches qcow2 bytes: write empty overlays, read headers and chains.

Empty overlays are written in-process because spawning ``qemu-img create`` costs ~12 ms
while the file is a fixed few clusters of metadata (~0.2 ms to write). Everything
heavier (flattening, checking) is left to ``qemu-img``, the reference implementation.

Overlay layout (cluster size 64 KiB): cluster 0 header + extensions + backing name,
cluster 1 refcount table, cluster 2 refcount block, clusters 3.. the (all zero) L1
table. The file is sparse: only the header and refcount entries are written.
"""

from __future__ import annotations

import array
import functools
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boxvm.errors import StorageError
from boxvm.streams import pread_views

MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
HEADER_V3 = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # up to and including header_length
HEADER_LENGTH = 112  # v3 header with the compression type byte, padded to 8
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2
MAX_BACKING_NAME = 1023
_HEADER_REGION = HEADER_LENGTH + 64 + MAX_BACKING_NAME  # header, extensions (at most one of ours) and name
_FIRST_READ = 4096  # a header's first read: all of ours; a longer one is read again whole (a 64 KiB read costs ~5x)


@dataclass(frozen=True)
class Header:
    version: int
    size: int
    cluster_bits: int
    backing_file: str | None
    backing_format: str | None
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    incompatible_features: int
    crypt_method: int
    nb_snapshots: int
    data_file: str | None


def write_overlay(path: Path, size: int, backing: str | None, backing_format: str = "qcow2", sync: bool = True) -> None:
    """Write an empty qcow2 v3 image of virtual ``size`` over ``backing`` (a path relative
    to ``path``'s directory, or absolute) and fsync it (``sync=False``: the caller does, e.g.
    several files at once). Fails if ``path`` exists."""
    writes, length = _overlay(size, backing, backing_format)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, length)
        if sync:
            os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if exc.errno == 28:
            raise StorageError(f"no space left for {path.name}: free some disk space") from exc
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    os.close(fd)


def is_empty_overlay(path: Path, backing: str | None, backing_format: str = "qcow2") -> bool:
    """True if ``path`` is byte for byte what :func:`write_overlay` writes over ``backing``
    (its size read from its own header): a top whose writes a crash may have lost (a
    fresh top, never synced) passes only if nothing of it was lost. Reads ~3 small ranges."""
    try:
        size = read_header(path).size
        writes, length = _overlay(size, backing, backing_format)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return False
    try:
        if os.fstat(fd).st_size != length:
            return False
        return all(os.pread(fd, len(data), offset) == data for offset, data in writes)
    finally:
        os.close(fd)


def repoint_empty(path: Path, old_ok: Callable[[str], bool], backing: str) -> bool:
    """Point an empty overlay (byte for byte what :func:`write_overlay` wrote over a
    backing name ``old_ok`` accepts: it holds no data) at another qcow2 ``backing``, in
    place: one open, three small reads and one write of its header region; no new file, no
    rename. False (nothing written) if ``path`` is not such an overlay. Not synced, not
    atomic: only for a top its record marks fresh, which a cut write leaves regenerable.
    The file is checked here, from the one descriptor, before it is written: it is not
    trusted to be what the record says (a crash may have cut it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        head = os.pread(fd, _HEADER_REGION, 0)
        if len(head) < HEADER_LENGTH or head[:8] != MAGIC + b"\0\0\0\3":
            return False
        name_at, name_len, size = struct.unpack_from(">QI4xQ", head, 8)
        if not 0 < name_len <= MAX_BACKING_NAME or name_at + name_len > len(head):
            return False
        old = os.fsdecode(head[name_at : name_at + name_len])
        if not old_ok(old):
            return False
        writes, length = _overlay(size, old, "qcow2")
        if os.fstat(fd).st_size != length or head != _header_region(writes[0][1]):
            return False
        if any(os.pread(fd, len(data), offset) != data for offset, data in writes[1:]):
            return False
        os.pwrite(fd, _header_region(_overlay(size, backing, "qcow2")[0][0][1]), 0)
        return True
    except ValueError:  # a size _overlay refuses: not one we wrote
        return False
    finally:
        os.close(fd)


def _header_region(first: bytes) -> bytes:
    """An overlay's first write padded with zeros over the whole region its header,
    extensions and backing name can span (what :func:`repoint_empty` reads and writes)."""
    return first + bytes(_HEADER_REGION - len(first))


@functools.lru_cache(maxsize=64)
def _overlay(size: int, backing: str | None, backing_format: str) -> tuple[tuple[tuple[int, bytes], ...], int]:
    """The writes (offset, bytes) and the length of an empty overlay; the rest is zeros.
    Cached: a pure function of its arguments, asked for the same few tops again and again."""
    if size <= 0 or size % 512:
        raise ValueError(f"virtual size must be a positive multiple of 512, not {size}")
    l2_entries = CLUSTER // 8
    l1_size = -(-size // (CLUSTER * l2_entries))
    l1_clusters = max(1, -(-l1_size * 8 // CLUSTER))
    refcount_table, refcount_block, l1_table = CLUSTER, 2 * CLUSTER, 3 * CLUSTER
    total_clusters = 3 + l1_clusters
    extensions = b""
    name = b""
    if backing is not None:
        name = os.fsencode(backing)
        if not 0 < len(name) <= MAX_BACKING_NAME:
            raise ValueError(f"backing file name must be 1..{MAX_BACKING_NAME} bytes")
        fmt = backing_format.encode()
        extensions += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + b"\0" * (-len(fmt) % 8)
    extensions += struct.pack(">II", 0, 0)
    backing_offset = HEADER_LENGTH + len(extensions) if name else 0
    header = HEADER_V3.pack(
        MAGIC, 3, backing_offset, len(name), CLUSTER_BITS, size, 0, l1_size, l1_table,
        refcount_table, 1, 0, 0, 0, 0, 0, 4, HEADER_LENGTH,
    )  # fmt: skip
    header += b"\0" * (HEADER_LENGTH - len(header))  # compression type 0 (zlib) + padding
    refcounts = struct.pack(f">{total_clusters}H", *([1] * total_clusters))
    writes = (
        (0, header + extensions + name),
        (refcount_table, struct.pack(">Q", refcount_block)),
        (refcount_block, refcounts),
    )
    return writes, total_clusters * CLUSTER


def read_header(path: Path) -> Header:
    """Parse a qcow2 header (v2 or v3) and the extensions boxvm cares about.

    Raises ValueError for anything that is not a well-formed qcow2 header.
    """
    # Not a buffered file: half the system calls. O_NONBLOCK: a name a header gives may be
    # a FIFO (a running box's QEMU writes its top's), whose open would wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        head = os.pread(fd, _FIRST_READ, 0)
        if len(head) == _FIRST_READ:
            try:
                return _parse_header(path, head, partial=True)
            except _NeedMore:
                head = os.pread(fd, CLUSTER, 0)
    finally:
        os.close(fd)
    return _parse_header(path, head, partial=False)


class _NeedMore(Exception):
    """The header's fields reach past the first read (a long name or many extensions)."""


def _parse_header(path: Path, head: bytes, partial: bool) -> Header:
    """``head``: the file's first bytes, all of its header cluster unless ``partial``
    (then :class:`_NeedMore` if a field reaches past them)."""
    if len(head) < 72 or head[:4] != MAGIC:
        raise ValueError(f"{path.name} is not a qcow2 image")
    version = struct.unpack_from(">I", head, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"{path.name}: unsupported qcow2 version {version}")
    (
        _m, _v, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
        rc_offset, rc_clusters, nb_snapshots, _snap_offset,
    ) = struct.unpack_from(">4sIQIIQIIQQIIQ", head, 0)  # fmt: skip
    incompat, header_length = 0, 72
    if version == 3:
        if len(head) < 104:
            raise ValueError(f"{path.name}: truncated qcow2 v3 header")
        incompat = struct.unpack_from(">Q", head, 72)[0]
        header_length = struct.unpack_from(">I", head, 100)[0]
        if partial and header_length > len(head):
            raise _NeedMore
        if not 104 <= header_length <= len(head):
            raise ValueError(f"{path.name}: bad header length {header_length}")
    if not 9 <= cluster_bits <= 21:
        raise ValueError(f"{path.name}: bad cluster size 2^{cluster_bits}")
    backing = None
    if backing_offset:
        if partial and backing_offset + backing_size > len(head):
            raise _NeedMore
        if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > len(head):
            raise ValueError(f"{path.name}: backing file name outside the header cluster")
        backing = os.fsdecode(head[backing_offset : backing_offset + backing_size])
    backing_format = data_file = None
    pos = header_length
    while version == 3:
        if pos + 8 > len(head):  # (an extension cut by the end of a partial read ends here too)
            if partial:
                raise _NeedMore
            break
        ext_type, ext_len = struct.unpack_from(">II", head, pos)
        if ext_type == 0:
            break
        data = head[pos + 8 : pos + 8 + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = data.decode(errors="replace")
        elif ext_type == EXT_DATA_FILE:
            data_file = data.decode(errors="replace")
        pos += 8 + ext_len + (-ext_len % 8)
    return Header(
        version, size, cluster_bits, backing, backing_format, l1_size, l1_offset, rc_offset, rc_clusters,
        incompat, crypt, nb_snapshots, data_file,
    )  # fmt: skip


def allocated_bytes(path: Path) -> int:
    """Host bytes a (sparse) image file really occupies; 0 if it is gone."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def resolve_backing(path: Path, backing: str) -> Path:
    """Where a backing reference points: relative names are relative to the image's directory."""
    return Path(backing) if os.path.isabs(backing) else path.parent / backing


def chain(path: Path) -> list[Path]:
    """The image and its backing files, top first, as normalised paths (raw bases included)."""
    out = [Path(os.path.normpath(path))]
    seen = {out[0]}
    current = out[0]
    while True:
        try:
            header = read_header(current)
        except ValueError:
            return out  # a raw base ends the chain
        if header.backing_file is None:
            return out
        nxt = Path(os.path.normpath(resolve_backing(current, header.backing_file)))
        if nxt in seen:
            raise StorageError(f"backing chain of {path} loops at {nxt}")
        seen.add(nxt)
        out.append(nxt)
        current = nxt


def flatten(top: Path, dest: Path) -> None:
    """Write ``top``'s whole chain as one standalone qcow2 (no backing) at ``dest``."""
    _convert(["-f", "qcow2", "-O", "qcow2", str(top), str(dest)], dest, f"could not flatten {top.name}")


def from_raw(raw: Path, dest: Path) -> None:
    """Write the raw disk image ``raw`` (an image's ext4 filesystem) as a qcow2 at ``dest``;
    only its written clusters are allocated, so a sparse raw file stays small."""
    _convert(["-f", "raw", "-O", "qcow2", str(raw), str(dest)], dest, f"could not convert {raw.name} to qcow2")


def _convert(args: list[str], dest: Path, failure: str) -> None:
    proc = subprocess.run(["qemu-img", "convert", "-q", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        dest.unlink(missing_ok=True)
        msg = proc.stderr.strip()
        if "No space left" in msg:
            raise StorageError(f"no space left while copying the disk to {dest.parent}: free some space")
        raise StorageError(f"{failure}: {msg}")


# -- reading a chain's allocation and streaming it flattened ------------------------
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
FLAG_COPIED = 1 << 63
FLAG_COMPRESSED = 1 << 62
FLAG_ZERO = 1
INCOMPAT_EXTENDED_L2 = 1 << 4


MAX_VIRTUAL = 2 << 40  # the largest disk a box may have (BoxOptions: 2048 GiB)
MAX_L1_ENTRIES = (32 << 20) // 8  # QEMU's own limit on an L1 table (32 MiB)
MAX_REFCOUNT_TABLE_CLUSTERS = (8 << 20) // CLUSTER  # QEMU's own limit on the refcount table (8 MiB)
_ZERO_TABLE = bytes(CLUSTER)


def max_file_size(virtual_size: int) -> int:
    """The most bytes a qcow2 (64 KiB clusters) of ``virtual_size`` can need with no cluster
    used twice: data, L2 tables and 64-bit refcount blocks for every guest cluster, the
    largest L1 and refcount tables QEMU allows, the header, and 64 MiB of slack."""
    clusters = -(-virtual_size // CLUSTER)
    per_table = CLUSTER // 8
    tables = -(-clusters // per_table)
    fixed = 1 + MAX_L1_ENTRIES * 8 // CLUSTER + MAX_REFCOUNT_TABLE_CLUSTERS + 1024
    return (clusters + 2 * tables + fixed) * CLUSTER


def allocation(path: Path, max_virtual: int = MAX_VIRTUAL) -> dict[int, int | None]:
    """Guest cluster index -> host offset of the data in ``path`` (None: reads as zeros),
    for the clusters this one image defines. Unlisted clusters fall through to the backing.

    Every table offset is checked against the file size, so a hostile image cannot make
    us read outside it, and no host cluster may serve twice (see ``check``). Compressed
    clusters and extended L2 entries are refused (boxvm never writes them).
    """
    out: dict[int, int | None] = {}
    _walk(path, max_virtual, out)
    return out


def check(path: Path, max_virtual: int = MAX_VIRTUAL) -> int:
    """Validate ``path``'s tables like ``allocation`` without building its map (memory stays
    at one byte per host cluster); returns the number of data clusters."""
    return _walk(path, max_virtual, None)


def _walk(path: Path, max_virtual: int, out: dict[int, int | None] | None) -> int:
    """Walk the L1/L2 tables with every bound checked before anything is allocated.

    A bytearray with one byte per host cluster records which clusters serve as header,
    L1, refcount table/blocks, L2 tables and data: a cluster claimed twice is refused, so
    the walk can never cost more than the file holds (every L1 entry pointing at the same
    L2 table once made a 400-byte archive cost 2 GiB).
    """
    header = read_header(path)
    name = path.name
    if header.cluster_bits != CLUSTER_BITS:
        raise ValueError(f"{name}: cluster size 2^{header.cluster_bits} is not supported")
    if header.crypt_method or header.incompatible_features & (INCOMPAT_DATA_FILE | INCOMPAT_EXTENDED_L2):
        raise ValueError(f"{name}: encrypted, external-data or extended-L2 images are not supported")
    if header.nb_snapshots:
        raise ValueError(f"{name}: internal snapshots are not supported")
    if not 0 < header.size <= max_virtual:
        raise ValueError(f"{name}: virtual size {header.size} is outside 1..{max_virtual} bytes")
    file_size = path.stat().st_size
    l2_entries = CLUSTER // 8
    needed_l1 = -(-header.size // (CLUSTER * l2_entries))
    if not needed_l1 <= header.l1_size <= MAX_L1_ENTRIES or header.l1_table_offset % CLUSTER:
        raise ValueError(f"{name}: L1 table too small, too large or misaligned")
    if header.l1_table_offset + header.l1_size * 8 > file_size:
        raise ValueError(f"{name}: L1 table points past the end of the file")
    rt_offset, rt_clusters = header.refcount_table_offset, header.refcount_table_clusters
    if rt_offset % CLUSTER or not 0 < rt_clusters <= MAX_REFCOUNT_TABLE_CLUSTERS:
        raise ValueError(f"{name}: refcount table misaligned or of a bad size")
    if rt_offset + rt_clusters * CLUSTER > file_size:
        raise ValueError(f"{name}: refcount table points past the end of the file")
    n_clusters = -(-file_size // CLUSTER)
    used = bytearray(n_clusters)

    def claim(first: int, count: int, what: str) -> None:
        for c in range(first, first + count):
            if used[c]:
                raise ValueError(f"{name}: cluster {c} serves twice (as {what})")
            used[c] = 1

    claim(0, 1, "header")
    claim(header.l1_table_offset // CLUSTER, -(-header.l1_size * 8 // CLUSTER), "L1 table")
    claim(rt_offset // CLUSTER, rt_clusters, "refcount table")
    data = 0
    with path.open("rb") as f:
        fd = f.fileno()
        table = array.array("Q", os.pread(fd, rt_clusters * CLUSTER, rt_offset))
        if sys.byteorder == "little":
            table.byteswap()
        for entry in table:
            if entry:
                if entry % CLUSTER or entry + CLUSTER > file_size:
                    raise ValueError(f"{name}: a refcount block points outside the file")
                claim(entry // CLUSTER, 1, "refcount block")
        del table
        l1 = struct.unpack(f">{needed_l1}Q", os.pread(fd, needed_l1 * 8, header.l1_table_offset))
        for i, entry in enumerate(l1):
            l2_offset = entry & L2_OFFSET_MASK
            if not l2_offset:
                continue
            if l2_offset % CLUSTER or l2_offset + CLUSTER > file_size:
                raise ValueError(f"{name}: an L2 table points outside the file")
            claim(l2_offset // CLUSTER, 1, "L2 table")
            raw = os.pread(fd, CLUSTER, l2_offset)
            if raw == _ZERO_TABLE:
                continue
            base = i * l2_entries
            for j, e in enumerate(struct.unpack(f">{l2_entries}Q", raw)):
                if not e:
                    continue
                if e & FLAG_COMPRESSED:
                    raise ValueError(f"{name}: compressed clusters are not supported")
                offset = e & L2_OFFSET_MASK
                if offset:
                    c = offset >> CLUSTER_BITS
                    if offset & (CLUSTER - 1) or c >= n_clusters or offset + CLUSTER > file_size:
                        raise ValueError(f"{name}: a data cluster points outside the file")
                    if used[c]:
                        raise ValueError(f"{name}: cluster {c} serves twice (as data)")
                    used[c] = 1
                if e & FLAG_ZERO:
                    if out is not None:
                        out[base + j] = None
                elif offset:
                    data += 1
                    if out is not None:
                        out[base + j] = offset
    return data


@dataclass(frozen=True)
class FlatImage:
    """A chain flattened into one standalone qcow2, laid out before any data is read."""

    size: int  # bytes of the qcow2 file the stream produces
    virtual_size: int
    data_bytes: int  # allocated guest data carried
    _runs: list[tuple[int, Path, int, int]]  # (guest index, file, host offset, clusters)
    _head: bytes  # header, L1, refcount table and blocks, L2 tables

    def chunks(self, max_chunk: int = 4 << 20) -> Iterator[bytes | memoryview]:
        """The file's bytes in order: metadata first, then data clusters by guest index, as
        views of one buffer that each next piece overwrites (``streams.pread_views``)."""
        yield self._head
        buf = memoryview(bytearray(min(max_chunk, self.data_bytes)))
        files: dict[Path, int] = {}
        try:
            for _idx, path, offset, count in self._runs:
                fd = files.get(path)
                if fd is None:
                    fd = files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    yield from pread_views(fd, offset, count * CLUSTER, buf)
                except EOFError:
                    raise StorageError(f"{path.name} is shorter than its tables say") from None
        finally:
            for fd in files.values():
                os.close(fd)


def flatten_plan(top: Path) -> FlatImage:
    """Plan the standalone image of ``top``'s whole chain from metadata alone."""
    layers = chain(top)
    virtual_size = read_header(layers[0]).size
    merged: dict[int, tuple[Path, int | None]] = {}
    for path in reversed(layers):  # base first, so upper layers override
        for idx, offset in allocation(path).items():
            merged[idx] = (path, offset)
    data = sorted((idx, path, off) for idx, (path, off) in merged.items() if off is not None)
    l2_entries = CLUSTER // 8
    l1_size = max(1, -(-virtual_size // (CLUSTER * l2_entries)))
    l1_clusters = -(-l1_size * 8 // CLUSTER)
    l2_indices = sorted({idx // l2_entries for idx, _p, _o in data})
    n_data, n_l2 = len(data), len(l2_indices)
    rb_entries = CLUSTER // 2  # 16-bit refcounts
    rb_count, rt_clusters = 1, 1
    while True:  # the refcount structures count themselves
        total = 1 + l1_clusters + rt_clusters + rb_count + n_l2 + n_data
        need_rb = -(-total // rb_entries)
        need_rt = -(-need_rb * 8 // CLUSTER)
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = need_rb, need_rt
    l1_off = CLUSTER
    rt_off = l1_off + l1_clusters * CLUSTER
    rb_off = rt_off + rt_clusters * CLUSTER
    l2_off = rb_off + rb_count * CLUSTER
    data_off = l2_off + n_l2 * CLUSTER
    header = HEADER_V3.pack(
        MAGIC, 3, 0, 0, CLUSTER_BITS, virtual_size, 0, l1_size, l1_off, rt_off, rt_clusters, 0, 0,
        0, 0, 0, 4, HEADER_LENGTH,
    )  # fmt: skip
    head = bytearray(data_off)
    head[: len(header)] = header
    struct.pack_into(">II", head, HEADER_LENGTH, 0, 0)  # end of header extensions
    l2_slot = {l1_idx: l2_off + k * CLUSTER for k, l1_idx in enumerate(l2_indices)}
    for l1_idx, off in l2_slot.items():
        struct.pack_into(">Q", head, l1_off + l1_idx * 8, off | FLAG_COPIED)
    for k, (idx, _path, _off) in enumerate(data):
        entry_at = l2_slot[idx // l2_entries] + (idx % l2_entries) * 8
        struct.pack_into(">Q", head, entry_at, (data_off + k * CLUSTER) | FLAG_COPIED)
    for b in range(rb_count):
        struct.pack_into(">Q", head, rt_off + b * 8, rb_off + b * CLUSTER)
    refcounts = struct.pack(f">{total}H", *([1] * total))
    head[rb_off : rb_off + len(refcounts)] = refcounts
    runs: list[tuple[int, Path, int, int]] = []
    for idx, path, off in data:  # coalesce clusters adjacent in both guest and host order
        if (
            runs
            and runs[-1][1] == path
            and runs[-1][0] + runs[-1][3] == idx
            and (runs[-1][2] + runs[-1][3] * CLUSTER == off)
        ):
            g, p, o, c = runs[-1]
            runs[-1] = (g, p, o, c + 1)
        else:
            runs.append((idx, path, off, 1))
    return FlatImage(data_off + n_data * CLUSTER, virtual_size, n_data * CLUSTER, runs, bytes(head))
