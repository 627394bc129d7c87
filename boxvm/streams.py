"""Byte streams between the event loop and a worker thread, with backpressure both ways.

The stdlib ``tarfile`` and our archive code are blocking, while their bytes come from
or go to async sources (a guest channel, an HTTP body, a WebSocket). These two bridges
hand chunks across through a bounded ``asyncio.Queue``, so the side that is ahead
waits and memory stays at a few chunks whatever the size of the stream.
"""

from __future__ import annotations

import asyncio
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
_DEPTH = 8  # chunks in flight
BATCH = 1 << 20  # bytes per chunk handed across: per-chunk costs (HTTP framing, wakeups) stay small


def pread_views(fd: int, offset: int, length: int, buf: memoryview) -> Iterator[memoryview]:
    """``length`` bytes of ``fd`` from ``offset``, read into ``buf`` a piece at a time: each
    piece is a view the next one overwrites, for readers that hash and compress it at once
    (one that keeps a piece copies it). A new ``bytes`` per read faulted in fresh pages
    whenever an upload held the archive's chunks (6 % of an S3 export's CPU, perf).
    EOFError if the file ends first."""
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [buf[: end - offset]], offset)
        if not n:
            raise EOFError(f"the file ends {end - offset} bytes short")
        yield buf[:n]
        offset += n


class StreamAborted(OSError):
    """The other side of a bridge went away mid-stream."""


class Reader(Protocol):
    """A blocking reader a worker thread reads an archive from."""

    def read(self, n: int = -1) -> bytes: ...

    def peek(self, n: int = 1) -> bytes: ...

    def abort(self) -> None:
        """(From any thread.) Make the next read raise StreamAborted."""

    def close(self) -> None:
        """Release the source, and any thread reading ahead of the reader (joined)."""


class Source(ABC):
    """Bytes that an async consumer (an upload to a server) iterates chunk by chunk, and an
    in-process worker thread instead ``open``s as a blocking reader: then no chunk passes
    through the event loop (two hand-overs a MiB, ~0.4 s of loop CPU per 250 MB, taken
    from the two cores the verifier's threads run on)."""

    _chunks: AsyncIterator[bytes] | None = None

    @abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The bytes as a fresh async iterator."""

    @abstractmethod
    def open(self) -> Reader:
        """The bytes as a blocking reader (cheap to call on the loop: no I/O waits here)."""

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            self._chunks = self.chunks()
        return await anext(self._chunks)

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()  # type: ignore[attr-defined]


class FileSource(Source):
    """A host file (an archive being imported)."""

    def __init__(self, path: Path, chunk: int = 4 << 20) -> None:
        self.path, self._chunk = path, chunk

    async def chunks(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        with self.path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, self._chunk):
                yield chunk

    def open(self) -> Reader:
        return _FileReader(self.path)


class _FileReader:
    def __init__(self, path: Path) -> None:
        self._file = path.open("rb", buffering=1 << 20)
        self._aborted = False

    def read(self, n: int = -1) -> bytes:
        if self._aborted:
            raise StreamAborted("the import was cancelled")
        return self._file.read(n)

    def peek(self, n: int = 1) -> bytes:
        return self._file.peek(n)

    def abort(self) -> None:
        self._aborted = True

    def close(self) -> None:
        self._file.close()


class _Chunked:
    """A blocking reader over chunks that ``_next`` appends one at a time. Readers take small
    pieces (zstd ~128 KiB, tar 512 B) of 1 MiB chunks: slice by offset, since re-slicing the
    rest each time copied every chunk ~5 times."""

    _buf = b""
    _pos = 0

    def _next(self) -> bool:
        """Append the next chunk (``_append``); False at the end of the input."""
        raise NotImplementedError

    def _append(self, chunk: bytes) -> None:
        self._buf, self._pos = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk, 0

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._buf) and not self._next():
            return b""
        end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
        data = self._buf[self._pos : end]
        self._pos = end
        return data

    def peek(self, n: int = 1) -> bytes:
        while len(self._buf) - self._pos < n and self._next():
            pass
        return self._buf[self._pos :]


class ReadAhead(_Chunked):
    """A blocking reader fed by a thread of its own that runs ``produce`` (a download) at
    most ``depth`` chunks ahead of the consumer, so fetching overlaps the consumer's work:
    memory stays at ``depth`` chunks, plus the one being read and the one being fetched. An exception in ``produce`` is
    raised by the read that reaches it (after the chunks before it); ``close`` (or ``abort``)
    stops the thread at its next chunk and joins it; ``interrupt``, if given, is called by
    ``abort`` to cut short whatever ``produce`` is waiting for (a network read)."""

    def __init__(
        self,
        produce: Callable[[], Generator[bytes, None, None]],
        depth: int = 16,
        name: str = "boxvm-read-ahead",
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self._interrupt = interrupt  # called by abort, to wake a producer blocked outside this reader
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._depth = depth
        self._error: BaseException | None = None
        self._done = self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Generator[bytes, None, None]]) -> None:
        try:
            chunks = produce()
            try:
                for chunk in chunks:
                    with self._cond:
                        while len(self._chunks) >= self._depth and not self._stopped:
                            self._cond.wait()
                        if self._stopped:
                            return
                        self._chunks.append(chunk)
                        self._cond.notify_all()
            finally:
                chunks.close()  # the generator's own cleanup (a response closed)
        except BaseException as exc:
            self._error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _next(self) -> bool:
        with self._cond:
            while not self._chunks and not self._done and not self._stopped:
                self._cond.wait()
            if self._stopped:
                raise StreamAborted("the import was cancelled")
            if self._chunks:
                self._append(self._chunks.popleft())
                self._cond.notify_all()
                return True
            if self._error is not None:
                raise self._error
            return False

    def read(self, n: int = -1) -> bytes:
        if self._stopped:
            raise StreamAborted("the import was cancelled")
        return super().read(n)

    def abort(self) -> None:
        with self._cond:
            self._stopped = True
            self._chunks.clear()
            self._cond.notify_all()
        if self._interrupt is not None:
            self._interrupt()

    def close(self) -> None:
        """Abort, and wait for the thread: ``_LINGER`` seconds at most, since a producer can be
        blocked where neither the stop nor ``interrupt`` reaches (a request a store never
        answers, bounded by its own timeouts): it is a daemon, and what it produces is dropped."""
        self.abort()
        self._thread.join(self._LINGER)

    _LINGER = 30.0


class ThreadReader(_Chunked):
    """A blocking, file-like reader for a worker thread, fed chunk by chunk from the loop
    (or, once ``pump`` attaches a ``Source``'s own reader, reading that directly)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_DEPTH)
        self._eof = False
        self._direct: Reader | None = None
        self.aborted = False  # set on the loop: an importer checks it on the loop before its commit

    async def feed(self, chunk: bytes) -> None:
        if chunk:
            await self._queue.put(chunk)

    async def end(self) -> None:
        await self._queue.put(b"")

    def abort(self) -> None:
        """(On the loop.) Make the reader's next read raise StreamAborted."""
        self.aborted = True
        if self._direct is not None:
            self._direct.abort()
            return
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def _next(self) -> bool:
        if self._eof:
            return False
        chunk = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
        if chunk is None:
            raise StreamAborted("the input stream was cut off")
        if not chunk:
            self._eof = True
            return False
        self._append(chunk)
        return True

    def read(self, n: int = -1) -> bytes:
        return self._direct.read(n) if self._direct is not None else super().read(n)

    def peek(self, n: int = 1) -> bytes:
        return self._direct.peek(n) if self._direct is not None else super().peek(n)


async def pump(chunks: AsyncIterator[bytes], reader: ThreadReader, worker: Awaitable[T]) -> T:
    """Feed ``chunks`` to a worker thread reading ``reader`` and return its result. If the
    worker stops early its outcome wins; if the input fails, the worker is aborted. A
    ``Source`` is read by the worker directly (``Source.open``), and closed when it is done."""
    if isinstance(chunks, Source):
        return await _direct(chunks, reader, worker)
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
            if len(batch) >= BATCH:
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


async def _direct(source: Source, reader: ThreadReader, worker: Awaitable[T]) -> T:
    try:
        direct = reader._direct = source.open()
    except BaseException:
        if asyncio.iscoroutine(worker):
            worker.close()  # never started: nothing to wait for
        raise
    task: asyncio.Future[T] = asyncio.ensure_future(worker)
    try:
        return await asyncio.shield(task)
    except BaseException:
        reader.abort()  # cancelled: the worker's next read fails, and it checks before a commit
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        await asyncio.shield(asyncio.to_thread(direct.close))


class ThreadWriter:
    """A blocking, file-like writer for a worker thread, drained as an async iterator."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(_DEPTH)
        self._closed = False
        self._buf = bytearray()  # small writes (tar headers, the last piece) are batched

    def write(self, data: Any) -> int:
        if self._closed:
            raise StreamAborted("the reader of this stream went away")
        if not self._buf and len(data) >= BATCH:
            # a whole chunk (the archive's compressor writes them): no copy; a view of a
            # reused buffer (an uncompressed export's disk): one
            self._hand_over(data if type(data) is bytes else bytes(data))
            return len(data)
        self._buf += data
        if len(self._buf) >= BATCH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Hand what is buffered to the loop (writers call it when they are done)."""
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            self._hand_over(data)

    def _hand_over(self, data: bytes) -> None:
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
