"""Copy a running guest's RAM file for a memory snapshot, then fix up only what changed.

A memory snapshot must hold the RAM as it is when the vCPUs stop. Copying all of its data
(~130 MiB after a boot) while stopped was almost the whole guest pause, so the copy is
made while the guest runs, after clearing the kernel's *soft-dirty* bits of QEMU's page
tables (``/proc/<pid>/clear_refs``); once stopped, ``/proc/<pid>/pagemap`` names the pages
written since (bit 55), and only those are copied again. Every write to guest RAM, the
vCPUs' and QEMU's own device DMA alike, goes through QEMU's ``share=on`` mapping of the
file, so it sets the bit. Two ways a write could escape the bit are covered: a page that
became allocated (or a hole) since the running copy is copied too, and if the host
reclaimed any page meanwhile (which drops a page's table entry and its bit) the whole RAM
is copied while stopped, as it is when the kernel lacks soft-dirty (built without
``CONFIG_MEM_SOFT_DIRTY``, as here) or QEMU's mapping of the file cannot be found.

A private (``share=off``) mapping needs no soft-dirty: what its guest wrote is what the
kernel copied on write, QEMU's anonymous pages there (``WrittenPages``).

Written by hand: no library reads pagemap, and this is a few reads of /proc.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from boxvm.engine import memory

log = logging.getLogger("boxvm.memory")

PAGE = os.sysconf("SC_PAGE_SIZE")
ENTRY = 8  # bytes per page in /proc/<pid>/pagemap
SOFT_DIRTY = 1 << 55
# One byte per pagemap entry (its byte 6) mapped to 1 where bit 55 is set, else 0.
_SD_BYTE = bytes(1 if b & 0x80 else 0 for b in range(256))
_RUN = re.compile(rb"[^\x00]+")
# One byte per pagemap entry (its byte 7) mapped to 1 where the page is the mapping's own:
# swapped out (bit 62), or present (bit 63) and not a file or shared page (bit 61).
_WRITTEN_BYTE = bytes(1 if (b & 0x40) or (b & 0xA0) == 0x80 else 0 for b in range(256))


class Unavailable(Exception):
    """What /proc tells cannot vouch for this copy (soft-dirty bits, or a private mapping's
    written pages; the message says why)."""


@dataclass
class PreCopy:
    """What the running copy leaves for the stopped fix-up."""

    pid: int
    ram: Path
    dest: Path
    extents: list[tuple[int, int]]  # the RAM file's data extents the copy saw
    reclaimed: int  # the host's reclaimed-page counter when the bits were cleared


@cache
def supported() -> bool:
    """Whether this kernel tracks soft-dirty pages: a page just faulted in is soft-dirty."""
    buf = mmap.mmap(-1, PAGE)
    try:
        buf[0:1] = b"x"
        cell = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(cell)
        del cell  # the mmap cannot close while exported
        with open("/proc/self/pagemap", "rb") as f:
            entry = int.from_bytes(os.pread(f.fileno(), ENTRY, addr // PAGE * ENTRY), "little")
        return bool(entry & SOFT_DIRTY)
    except OSError:
        return False
    finally:
        buf.close()


def start(pid: int, ram: Path, dest: Path) -> PreCopy | None:
    """While the guest runs: clear QEMU's soft-dirty bits, then copy the RAM file's data to
    ``dest``. None (nothing copied) when soft-dirty cannot be used: copy at the stop."""
    if not supported():
        log.info("memory snapshot: the kernel has no soft-dirty tracking; the RAM is copied while the guest is stopped")
        return None
    try:
        reclaimed = _reclaimed()
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except OSError as exc:
        log.info("memory snapshot: cannot clear soft-dirty bits (%s); the RAM is copied while stopped", exc)
        return None
    memory.sparse_copy(ram, dest)
    return PreCopy(pid, ram, dest, data_extents(ram), reclaimed)


def finish(pre: PreCopy | None, ram: Path, dest: Path) -> tuple[int, str]:
    """With the vCPUs stopped: make ``dest`` a copy of ``ram`` as it is now. Returns the
    bytes copied now and how ("soft-dirty" or "full")."""
    if pre is not None:
        try:
            runs = _changed_runs(pre)
        except Unavailable as exc:
            log.info("memory snapshot: %s; the RAM is copied while the guest is stopped", exc)
        else:
            return _copy_runs(ram, dest, runs), "soft-dirty"
        dest.unlink()
    return memory.sparse_copy(ram, dest), "full"


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE), page-aligned outward."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start // PAGE * PAGE, min(size, -(-end // PAGE) * PAGE)))
            pos = end
    finally:
        os.close(fd)
    return out


def ram_vmas(pid: int, ram: Path) -> list[tuple[int, int, int]]:
    """QEMU's mappings of the RAM file as (start, end, file offset), found by the file's
    device and inode (a path in /proc/<pid>/maps can be renamed, deleted or spoofed)."""
    want, out = _file_id(ram), []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if _maps(fields, want):
                lo, hi = fields[0].split("-")
                out.append((int(lo, 16), int(hi, 16), int(fields[2], 16)))
    return out


def written_bytes(pid: int, ram: Path) -> int:
    """How much of QEMU's private mappings of ``ram`` the guest has written: the pages
    copied on write (``Anonymous`` in /proc/<pid>/smaps), which only its RAM holds."""
    want, total, inside = _file_id(ram), 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if not fields:
                continue
            if "-" in fields[0]:  # a mapping's first line; its fields follow
                inside = _maps(fields, want)
            elif inside and fields[0] == "Anonymous:":
                total += int(fields[1]) << 10  # kB
    return total


def _file_id(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _maps(fields: list[str], want: tuple[int, int, int]) -> bool:
    """Whether a mapping's line of /proc/<pid>/maps (or smaps), split, maps that file."""
    if len(fields) < 5 or ":" not in fields[3] or not fields[4].isdigit():
        return False
    major, minor = fields[3].split(":")
    return (int(major, 16), int(minor, 16), int(fields[4])) == want


def soft_dirty_map(pagemap: bytes) -> bytes:
    """One byte per pagemap entry: 1 where the page is soft-dirty."""
    return pagemap[6::ENTRY].translate(_SD_BYTE)


def _written_map(pagemap: bytes) -> bytes:
    """One byte per pagemap entry: 1 where the page is the mapping's own (written)."""
    return pagemap[7::ENTRY].translate(_WRITTEN_BYTE)


def _changed_runs(pre: PreCopy) -> list[tuple[int, int]]:
    """Byte ranges of the RAM file that may differ from the running copy."""
    pages = os.stat(pre.ram).st_size // PAGE
    if _reclaimed() != pre.reclaimed:
        raise Unavailable("the host reclaimed pages meanwhile (their soft-dirty bits are lost)")
    dirty = _page_flags(pre.pid, pre.ram, _vmas_checked(pre.pid, pre.ram), soft_dirty_map)
    changed = dirty | (_extent_bits(pre.extents, pages) ^ _extent_bits(data_extents(pre.ram), pages))
    return _runs(changed, pages)


def _vmas_checked(pid: int, ram: Path) -> list[tuple[int, int, int]]:
    """``ram_vmas``, or Unavailable if /proc cannot tell."""
    try:
        return ram_vmas(pid, ram)
    except OSError as exc:
        raise Unavailable(f"QEMU's mappings are unreadable ({exc.strerror})") from exc


def _page_flags(pid: int, ram: Path, vmas: list[tuple[int, int, int]], flags_of: Callable[[bytes], bytes]) -> int:
    """One byte per page of the RAM file, ``flags_of`` its pagemap entries in QEMU's
    mappings (``soft_dirty_map``, ``_written_map``), packed into an int (for |, ^);
    Unavailable unless the mappings cover the whole file."""
    pages = os.stat(ram).st_size // PAGE
    flags = 0
    covered = bytearray(pages)
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            for lo, hi, offset in vmas:
                first, n = offset // PAGE, (hi - lo) // PAGE
                n = min(n, pages - first)
                if n <= 0:
                    continue
                entries = os.pread(f.fileno(), n * ENTRY, lo // PAGE * ENTRY)
                if len(entries) != n * ENTRY:
                    raise Unavailable("QEMU's pagemap was short")
                flags |= int.from_bytes(flags_of(entries), "little") << (first * 8)
                covered[first : first + n] = b"\1" * n
    except OSError as exc:
        raise Unavailable(f"QEMU's pagemap is unreadable ({exc.strerror})") from exc
    if covered.count(0):
        raise Unavailable("QEMU does not map the whole RAM file")
    return flags


def _runs(flags: int, pages: int) -> list[tuple[int, int]]:
    """The byte ranges of the pages whose flag byte is set."""
    return [(m.start() * PAGE, m.end() * PAGE) for m in _RUN.finditer(flags.to_bytes(pages, "little"))]


class WrittenPages:
    """The pages a guest wrote to a privately mapped RAM file (a fork's or warm-started
    box's ``memory.base``): a write to a ``share=off`` mapping copies the page, so they are
    exactly QEMU's anonymous pages there (pagemap: present and not a file page, or swapped
    out), and only QEMU's memory holds them. Opening ``/proc/<pid>/mem`` needs ptrace
    access to QEMU (its parent has it); that and the mappings are checked here, before
    the guest stops, so a host that denies them gets Unavailable at once."""

    def __init__(self, pid: int, ram: Path) -> None:
        self.pid, self.ram = pid, ram
        self.vmas = _vmas_checked(pid, ram)
        _page_flags(pid, ram, self.vmas, _written_map)  # readable, and the whole file mapped
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Unavailable(f"QEMU's memory is not readable here ({exc.strerror})") from exc

    def copy_to(self, dest: Path) -> int:
        """With the vCPUs stopped: write every page the guest wrote over the same offset of
        ``dest`` (a copy of the RAM file); the bytes copied."""
        pages = os.stat(self.ram).st_size // PAGE
        runs = _runs(_page_flags(self.pid, self.ram, self.vmas, _written_map), pages)
        buf = memoryview(bytearray(1 << 20))
        out = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        total = 0
        try:
            for start, end in runs:
                off = start
                while off < end:
                    addr, mapped = self._address(off)
                    n = min(end - off, len(buf), mapped)
                    if os.preadv(self._mem, [buf[:n]], addr) != n:
                        raise OSError(f"QEMU's memory ended inside its RAM mapping at offset {off}")
                    done = 0
                    while done < n:
                        done += os.pwrite(out, buf[done:n], off + done)
                    off += n
                total += end - start
        finally:
            os.close(out)
        return total

    def _address(self, offset: int) -> tuple[int, int]:
        """QEMU's address of the file's byte ``offset`` and how many bytes are mapped
        contiguously from there."""
        for lo, hi, first in self.vmas:
            if first <= offset < first + (hi - lo):
                return lo + offset - first, first + (hi - lo) - offset
        raise Unavailable(f"QEMU does not map the RAM file at offset {offset}")

    def close(self) -> None:
        os.close(self._mem)


def _extent_bits(extents: list[tuple[int, int]], pages: int) -> int:
    """The extents as one byte per page (1 = data), packed into an int for |, ^."""
    mark = bytearray(pages)
    for start, end in extents:
        mark[start // PAGE : end // PAGE] = b"\1" * (end // PAGE - start // PAGE)
    return int.from_bytes(mark, "little")


def _copy_runs(src: Path, dst: Path, runs: list[tuple[int, int]]) -> int:
    """Copy the byte ranges of ``src`` over the same ranges of ``dst``, in the kernel."""
    total = 0
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for start, end in runs:
            off = start
            while off < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - off, off, off)
                if n == 0:
                    raise OSError(f"the RAM file ended at {off}")
                off += n
            total += end - start
    return total


def _reclaimed() -> int:
    """Pages the host has reclaimed so far (/proc/vmstat pgsteal_*; reclaim unmaps a page
    and drops its soft-dirty bit with it)."""
    with open("/proc/vmstat") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("pgsteal_"))
