"""The byte streams of the backend contract (``boxvm.streams.produced``): a failure before
the first byte raises at once, a later one after the bytes before it, and a stream its
reader abandons, even one never read (an HTTP client gone before the body), releases the
worker thread instead of leaving it blocked on a full bridge with its box claimed."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import IO

import pytest

from boxvm.errors import ArchiveError, InvalidState, StorageError
from boxvm.streams import FileSource, ReadAhead, Source, StreamAborted, ThreadReader, produced, pump

MIB = b"x" * (1 << 20)


class Worker:
    """Writes ``chunks`` MiB from a thread, then raises ``fail`` if given; records how it ended."""

    def __init__(self, chunks: int, fail: BaseException | None = None) -> None:
        self.chunks, self.fail = chunks, fail
        self.ended: BaseException | str | None = "running"  # None: finished

    async def work(self, out: IO[bytes]) -> None:
        def write() -> None:
            for _ in range(self.chunks):
                out.write(MIB)
            out.flush()
            if self.fail is not None:
                raise self.fail

        try:
            await asyncio.to_thread(write)
            self.ended = None
        except BaseException as exc:
            self.ended = exc
            raise


async def test_a_failure_before_the_first_byte_raises_at_once() -> None:
    async def refuse(out: IO[bytes]) -> None:
        raise InvalidState("cannot export box 'b' while it is snapshotting")

    with pytest.raises(InvalidState, match="snapshotting"):
        await produced(refuse)


async def test_a_later_failure_comes_after_the_bytes_written_before_it() -> None:
    stream = await produced(Worker(3, StorageError("disk gone")).work)
    got = bytearray()
    with pytest.raises(StorageError, match="disk gone"):
        async for chunk in stream:
            got += chunk
    assert len(got) == 3 * len(MIB)


@pytest.mark.parametrize("read_first", [0, 1])
async def test_an_abandoned_stream_releases_its_worker(read_first: int) -> None:
    worker = Worker(64)  # far more than the bridge holds
    stream = await produced(worker.work)
    for _ in range(read_first):
        await anext(stream)
    await asyncio.wait_for(stream.aclose(), 10)  # the worker would block forever otherwise
    assert isinstance(worker.ended, StreamAborted)


# -- read-ahead readers and Sources (the import path: a download thread feeding the verifier) --
def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def _numbered(count: int, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(count):
        yield bytes([i % 251]) * size


def test_a_read_ahead_reader_gives_every_byte_in_order_and_stays_bounded() -> None:
    produced_count = 0

    def produce() -> Generator[bytes, None, None]:
        nonlocal produced_count
        for chunk in _numbered(40, 100_000):
            produced_count += 1
            yield chunk

    reader = ReadAhead(produce, depth=4, name="test-ahead-order")
    try:
        assert reader.peek(4)[:4] == b"\0\0\0\0"
        got = bytearray(reader.read(7))
        time.sleep(0.2)  # the thread fills what it may, and no more
        assert produced_count <= 4 + 2  # the queue, the one handed over, the one waiting to go in
        while chunk := reader.read(65_536 + 3):
            got += chunk
        assert bytes(got) == b"".join(_numbered(40, 100_000))
        assert reader.read() == b""
    finally:
        reader.close()
    assert _threads("test-ahead-order") == []


def test_a_download_failure_is_raised_after_the_bytes_before_it() -> None:
    def produce() -> Generator[bytes, None, None]:
        yield b"a" * 1000
        raise StorageError("object storage failed on s3://b/k: InternalError")

    reader = ReadAhead(produce, name="test-ahead-fail")
    try:
        assert reader.read(1000) == b"a" * 1000
        with pytest.raises(StorageError, match="InternalError"):
            reader.read(1)
    finally:
        reader.close()
    assert _threads("test-ahead-fail") == []


def test_closing_a_read_ahead_reader_stops_a_producer_that_never_ends() -> None:
    closed = threading.Event()

    def produce() -> Generator[bytes, None, None]:
        try:
            while True:
                yield b"x" * 4096
        finally:
            closed.set()  # a response would be closed here

    reader = ReadAhead(produce, depth=2, name="test-ahead-endless")
    reader.read(10)
    reader.close()  # the producer is blocked on the full queue: close must wake and join it
    assert closed.is_set()
    assert _threads("test-ahead-endless") == []
    with pytest.raises(StreamAborted):
        reader.read(1)


class Endless(Source):
    """An endless source (a huge download) read through a ReadAhead thread."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def chunks(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        raise AssertionError("an in-process worker must read the source directly")
        yield b""

    def open(self) -> ReadAhead:
        def produce() -> Generator[bytes, None, None]:
            try:
                yield from _numbered(1 << 30)
            finally:
                self.closed.set()

        return ReadAhead(produce, depth=4, name="test-source")


async def test_a_cancelled_pump_stops_the_worker_and_the_read_ahead_thread() -> None:
    source, reader = Endless(), ThreadReader(asyncio.get_running_loop())
    started = threading.Event()
    ended: list[BaseException] = []

    def consume() -> None:
        try:
            while reader.read(1 << 20):
                started.set()
        except BaseException as exc:
            ended.append(exc)
            raise

    task = asyncio.ensure_future(pump(source, reader, asyncio.to_thread(consume)))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert len(ended) == 1 and isinstance(ended[0], StreamAborted)
    assert source.closed.is_set()
    assert _threads("test-source") == []


async def test_a_worker_failure_on_a_direct_source_is_the_pumps_error_and_closes_the_source() -> None:
    source, reader = Endless(), ThreadReader(asyncio.get_running_loop())

    def consume() -> None:
        reader.read(3 << 20)
        raise ArchiveError("the archive is corrupt")

    with pytest.raises(ArchiveError, match="corrupt"):
        await asyncio.wait_for(pump(source, reader, asyncio.to_thread(consume)), 10)
    assert source.closed.is_set()
    assert _threads("test-source") == []


async def test_a_file_source_reads_directly_in_process_and_by_chunks_for_a_remote_consumer(tmp_path: Path) -> None:
    path = tmp_path / "a.boxsnap"
    path.write_bytes(os.urandom(3 << 20) + b"end")
    got = b"".join([chunk async for chunk in FileSource(path, 1 << 20)])
    assert got == path.read_bytes()
    reader = ThreadReader(asyncio.get_running_loop())
    assert await pump(FileSource(path), reader, asyncio.to_thread(lambda: reader.read())) == path.read_bytes()


async def test_a_source_that_cannot_be_opened_fails_before_the_worker_starts(tmp_path: Path) -> None:
    started: list[int] = []

    async def worker() -> None:
        started.append(1)

    with pytest.raises(FileNotFoundError):
        await pump(FileSource(tmp_path / "gone.boxsnap"), ThreadReader(asyncio.get_running_loop()), worker())
    assert started == []
