"""Directory trees as tar streams for copy in/out, with backpressure both ways.

Tar is produced and consumed in a worker thread (the stdlib ``tarfile`` is blocking)
that hands chunks to and from the event loop through a bounded queue, so copying a
large tree never holds more than a few chunks in memory.
"""

from __future__ import annotations

import asyncio
import os
import queue
import stat
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from boxvm.errors import InvalidArgument, NotFound

_CHUNK = 256 << 10


class _Sink:
    """File-like object for tarfile's writer: each write is awaited on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._loop = loop
        self._send = send

    def write(self, data: bytes) -> int:
        asyncio.run_coroutine_threadsafe(self._send(bytes(data)), self._loop).result()
        return len(data)


async def send_tree(host_path: Path, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Stream ``host_path`` (file or tree) as a tar whose top entry is its base name."""
    if not os.path.lexists(host_path):
        raise NotFound(f"{host_path} does not exist on the host")
    loop = asyncio.get_running_loop()

    def produce() -> None:
        with tarfile.open(fileobj=_Sink(loop, send), mode="w|", bufsize=_CHUNK) as tar:  # type: ignore[call-overload]
            tar.add(host_path, arcname=host_path.name or ".")

    await asyncio.to_thread(produce)


class _Source:
    """File-like object for tarfile's reader, fed chunk by chunk from the event loop."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes] = queue.Queue(maxsize=8)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            chunk = self.chunks.get()
            if not chunk:
                return b""
            self._buf = chunk
        if n < 0 or n >= len(self._buf):
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data


def _box_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The stdlib ``data`` filter's safety (no escaping paths or links) but keep modes:
    a copy out of a box should keep permissions, minus setuid/setgid from an untrusted guest."""
    mode = member.mode
    safe = tarfile.data_filter(member, dest)
    if mode is not None and (member.isreg() or member.isdir()):
        safe = safe.replace(mode=mode & ~(stat.S_ISUID | stat.S_ISGID), deep=False)
    return safe


async def receive_tree(chunks: AsyncIterator[bytes], host_path: Path) -> None:
    """Extract a tar stream (top entry renamed to ``host_path``'s name unless it is an
    existing directory, as ``docker cp`` does)."""
    into_dir = host_path.is_dir()
    dest_dir = host_path if into_dir else host_path.parent
    if not dest_dir.is_dir():
        raise InvalidArgument(f"{dest_dir} is not a directory on the host")
    source = _Source()

    def consume() -> None:
        with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                if not into_dir:
                    _head, sep, rest = member.name.partition("/")
                    member.name = host_path.name + sep + rest
                tar.extract(member, dest_dir, filter=_box_filter)
        while source.read(_CHUNK):  # drain the tar's zero padding so the producer finishes
            pass

    worker = asyncio.create_task(asyncio.to_thread(consume))
    try:
        async for chunk in chunks:
            while not worker.done():
                try:
                    source.chunks.put_nowait(chunk)
                    break
                except queue.Full:
                    await asyncio.sleep(0.005)
    finally:
        while not worker.done():
            try:
                source.chunks.put_nowait(b"")
                break
            except queue.Full:
                await asyncio.sleep(0.005)
        await worker
