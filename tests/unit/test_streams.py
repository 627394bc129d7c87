"""The byte streams of the backend contract (``boxvm.streams.produced``): a failure before
the first byte raises at once, a later one after the bytes before it, and a stream its
reader abandons, even one never read (an HTTP client gone before the body), releases the
worker thread instead of leaving it blocked on a full bridge with its box claimed."""

from __future__ import annotations

import asyncio
from typing import IO

import pytest

from boxvm.errors import InvalidState, StorageError
from boxvm.streams import StreamAborted, produced

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
