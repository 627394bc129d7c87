"""Byte streams between the event loop and a worker thread, with backpressure both ways.

The stdlib ``tarfile`` and our archive code are blocking, while their bytes come from
or go to async sources (a guest channel, an HTTP body, a WebSocket). These two bridges
hand chunks across through a bounded ``asyncio.Queue``, so the side that is ahead
waits and memory stays at a few chunks whatever the size of the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
_DEPTH = 8  # chunks in flight
_BATCH = 1 << 20  # bytes per chunk handed across: per-chunk costs (HTTP framing, wakeups) stay small


class StreamAborted(OSError):
    """The other side of a bridge went away mid-stream."""


class ThreadReader:
    """A blocking, file-like reader for a worker thread, fed chunk by chunk from the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_DEPTH)
        self._buf = b""
        self._pos = 0
        self._eof = False

    async def feed(self, chunk: bytes) -> None:
        if chunk:
            await self._queue.put(chunk)

    async def end(self) -> None:
        await self._queue.put(b"")

    def abort(self) -> None:
        """(On the loop.) Make the reader's next read raise StreamAborted."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def _next(self) -> bool:
        chunk = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
        if chunk is None:
            raise StreamAborted("the input stream was cut off")
        if not chunk:
            self._eof = True
            return False
        self._buf, self._pos = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk, 0
        return True

    def read(self, n: int = -1) -> bytes:
        # Readers take small pieces (zstd ~128 KiB, tar 512 B) of 1 MiB chunks: slice by
        # offset, since re-slicing the rest each time copied every chunk ~5 times.
        if self._pos >= len(self._buf) and (self._eof or not self._next()):
            return b""
        end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
        data = self._buf[self._pos : end]
        self._pos = end
        return data

    def peek(self, n: int = 1) -> bytes:
        while len(self._buf) - self._pos < n and not self._eof and self._next():
            pass
        return self._buf[self._pos :]


async def pump(chunks: AsyncIterator[bytes], reader: ThreadReader, worker: Awaitable[T]) -> T:
    """Feed ``chunks`` to a worker thread reading ``reader`` and return its result. If the
    worker stops early its outcome wins; if the input fails, the worker is aborted."""
    task: asyncio.Future[T] = asyncio.ensure_future(worker)

    async def hand_over(data: bytes) -> bool:
        put = asyncio.ensure_future(reader.feed(data) if data else reader.end())
        await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            put.cancel()
            return False
        return True

    try:
        batch = bytearray()  # network reads are small (~64 KiB): hand over ~1 MiB at a time
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= _BATCH:
                if not await hand_over(bytes(batch)):
                    return await task
                batch.clear()
        if batch and not await hand_over(bytes(batch)):
            return await task
        await hand_over(b"")
    except BaseException:
        reader.abort()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return await task


class ThreadWriter:
    """A blocking, file-like writer for a worker thread, drained as an async iterator."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(_DEPTH)
        self._closed = False
        self._buf = bytearray()  # small writes (zstd emits ~128 KiB) are batched

    def write(self, data: Any) -> int:
        if self._closed:
            raise StreamAborted("the reader of this stream went away")
        self._buf += data
        if len(self._buf) >= _BATCH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Hand what is buffered to the loop (writers call it when they are done)."""
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()

    def abort(self) -> None:
        """(On the loop.) The consumer is gone: unblock the writer and fail its next write."""
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()

    async def chunks(self, producer: asyncio.Future[Any]) -> AsyncIterator[bytes]:
        """What is written until ``producer`` (whatever drives the thread) is done; its
        exception, if any, is raised after the bytes written before it."""
        try:
            while True:
                if self._queue.empty() and producer.done():
                    producer.result()
                    return
                get = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({get, producer}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
        finally:
            if not producer.done():  # the consumer stopped early: let the writer fail
                self.abort()


class ByteStream:
    """An async iterator of bytes whose ``aclose`` always releases its source, even when it
    was never iterated (an async generator's ``finally`` would then not run, and a worker
    blocked on a full bridge would hold its box forever). Consumers that may stop early use
    ``contextlib.aclosing``."""

    def __init__(self, chunks: AsyncIterator[bytes], release: Callable[[], Awaitable[None]]) -> None:
        self._chunks = chunks
        self._release = release
        self._closed = False

    def __aiter__(self) -> ByteStream:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._chunks.aclose()  # type: ignore[attr-defined]
            finally:
                await self._release()


async def produced(work: Callable[[ThreadWriter], Awaitable[Any]]) -> ByteStream:
    """Run ``work(sink)``, which writes from a worker thread into ``sink``, and return its bytes.

    Returns once the first bytes exist, so a failure before them (no such box, a refused
    state) raises here rather than in the middle of a stream; a later failure is raised by
    the iterator after the bytes written before it. Closing the stream early makes the
    worker's next write fail and waits for it to finish (its claims released)."""
    writer = ThreadWriter(asyncio.get_running_loop())
    task = asyncio.ensure_future(work(writer))
    chunks = writer.chunks(task)

    async def release() -> None:
        if not task.done():
            writer.abort()
        await asyncio.gather(task, return_exceptions=True)

    try:
        first = await anext(chunks, b"")
    except BaseException:
        await release()
        raise

    async def stream() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk

    return ByteStream(stream(), release)
