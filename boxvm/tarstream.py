"""Directory trees as tar streams for copy in/out, with backpressure both ways.

Tar is produced and consumed in a worker thread (the stdlib ``tarfile`` is blocking)
that hands chunks to and from the event loop with backpressure (``boxvm.streams``),
so copying a large tree never holds more than a few chunks in memory.
"""

from __future__ import annotations

import asyncio
import os
import stat
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from boxvm.errors import InvalidArgument, NotFound
from boxvm.streams import ThreadReader, ThreadWriter, pump

_CHUNK = 256 << 10


def tree_chunks(host_path: Path) -> AsyncIterator[bytes]:
    """``host_path`` (file or tree) as a tar stream whose top entry is its base name."""
    if not os.path.lexists(host_path):
        raise NotFound(f"{host_path} does not exist on the host")
    writer = ThreadWriter(asyncio.get_running_loop())

    def produce() -> None:
        with tarfile.open(fileobj=writer, mode="w|", bufsize=_CHUNK) as tar:  # type: ignore[call-overload]
            tar.add(host_path, arcname=host_path.name or ".")
        writer.flush()

    return writer.chunks(asyncio.ensure_future(asyncio.to_thread(produce)))


async def send_tree(host_path: Path, send: Callable[[bytes], Awaitable[None]]) -> None:
    async for chunk in tree_chunks(host_path):
        await send(chunk)


def extract_as_recorded(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path | str) -> None:
    """Extract a member exactly as recorded (owners, modes, devices): only for members the
    caller has already validated. Works on Python 3.11.2 (Debian's), which has no filters."""
    if hasattr(tarfile, "fully_trusted_filter"):
        tar.extract(member, dest, filter="fully_trusted")
    else:
        tar.extract(member, dest)


def check_member(member: tarfile.TarInfo, dest: Path) -> tarfile.TarInfo:
    """Refuse members of an untrusted tar that would land outside ``dest``: absolute or
    ``..`` paths, writes through symlinks, links pointing out, devices. Modes are kept
    minus setuid/setgid. (The stdlib's ``data`` filter would also change modes, and
    Debian's Python 3.11.2 does not have it.)"""
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"{name!r} escapes the destination")
    target = os.path.join(root, name)
    # A symlink member replaces whatever is there; anything else is opened (or chmod-ed)
    # through an existing link, so its resolved path must stay inside too.
    if not inside(os.path.dirname(target)) or (not member.issym() and not inside(target)):
        raise ValueError(f"{name!r} would be written through a link outside the destination")
    if member.issym():
        if member.linkname.startswith("/") or not inside(os.path.join(os.path.dirname(target), member.linkname)):
            raise ValueError(f"symlink {name!r} -> {member.linkname!r} points outside the destination")
    elif member.islnk():
        if member.linkname.startswith("/") or not inside(os.path.join(root, member.linkname)):
            raise ValueError(f"hard link {name!r} -> {member.linkname!r} points outside the destination")
    elif not (member.isreg() or member.isdir()):
        raise ValueError(f"{name!r} is a device or special file")
    member.mode = (member.mode or 0) & ~(stat.S_ISUID | stat.S_ISGID)
    member.uid, member.gid = os.getuid(), os.getgid()  # files copied out belong to the caller
    member.uname = member.gname = ""
    return member


async def receive_tree(chunks: AsyncIterator[bytes], host_path: Path) -> None:
    """Extract a tar stream (top entry renamed to ``host_path``'s name unless it is an
    existing directory, as ``docker cp`` does)."""
    into_dir = host_path.is_dir()
    dest_dir = host_path if into_dir else host_path.parent
    if not dest_dir.is_dir():
        raise InvalidArgument(f"{dest_dir} is not a directory on the host")
    source = ThreadReader(asyncio.get_running_loop())

    def consume() -> None:
        with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                if not into_dir:
                    _head, sep, rest = member.name.partition("/")
                    member.name = host_path.name + sep + rest
                extract_as_recorded(tar, check_member(member, dest_dir), dest_dir)
        while source.read(_CHUNK):  # drain the tar's zero padding so the producer finishes
            pass

    await pump(chunks, source, asyncio.to_thread(consume))
