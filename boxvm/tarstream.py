"""Directory trees as tar streams for copy in/out, with backpressure both ways.

Tar is produced and consumed in a worker thread (the stdlib ``tarfile`` is blocking)
that hands chunks to and from the event loop with backpressure (``boxvm.streams``),
so copying a large tree never holds more than a few chunks in memory.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from boxvm import tarsafe
from boxvm.errors import ArchiveError, InvalidArgument, NotFound
from boxvm.extract import COPY_OUT, extract
from boxvm.streams import ThreadReader, ThreadWriter, pump

_CHUNK = 256 << 10
_TRAILER = 1 << 20  # bytes after a copy-out's end of archive (tar pads to 10 KiB records)


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


def extract_as_recorded(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path | str) -> None:
    """Extract a member exactly as recorded (owners, modes, devices): only for trusted
    tars (verified Debian packages). Works on Python 3.11.2 (Debian's), which has no filters."""
    if hasattr(tarfile, "fully_trusted_filter"):
        tar.extract(member, dest, filter="fully_trusted")
    else:
        tar.extract(member, dest)


async def receive_tree(chunks: AsyncIterator[bytes], host_path: Path, box_path: str) -> None:
    """Extract an untrusted tar stream (a guest's ``copy_out`` of ``box_path``) as ``docker
    cp`` does: into ``host_path/<basename of box_path>`` when ``host_path`` is an existing
    directory, else as ``host_path``. Every member lands under that one entry whatever the
    stream names, so a guest cannot write beside it (``~/.bashrc`` when copying into ``~``);
    directories that already existed keep their attributes. Containment is by file
    descriptors (``boxvm.extract``); a refused or unreadable stream raises ArchiveError and
    removes the top-level entry if it created it."""
    into_dir = host_path.is_dir()
    dest_dir = host_path if into_dir else host_path.parent
    top = PurePosixPath(box_path).name if into_dir else host_path.name
    if not top or top in (".", ".."):
        raise InvalidArgument(f"cannot copy {box_path!r} into {host_path}: name a new destination path instead")
    if not dest_dir.is_dir():
        raise InvalidArgument(f"{dest_dir} is not a directory on the host")
    source = ThreadReader(asyncio.get_running_loop())

    def drain() -> None:
        """Read the tar's zero padding, so the producer finishes; not a stream of junk."""
        trailing = 0
        while data := source.read(_CHUNK):
            trailing += len(data)
            if trailing > _TRAILER:
                raise ArchiveError("the box went on sending after the end of the tar stream to copy out")

    def consume() -> None:
        root = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with tarsafe.open_stream(source) as tar:
                extract(tar, root, COPY_OUT, top=top, then=drain)
        except tarfile.TarError as exc:
            raise ArchiveError(f"the tar stream to copy out is unreadable or unsafe: {exc}") from exc
        finally:
            os.close(root)

    await pump(chunks, source, asyncio.to_thread(consume))
