"""A TCP proxy on 127.0.0.1 that caps each connection's throughput, as a remote object store
does: AWS S3 serves one connection at ~50-100 MB/s, and clients reach more by running
requests in parallel. Put in front of the tests' SeaweedFS, it shows what loopback hides:
a transfer that uses one connection is as slow as that cap, whatever the host.

Each direction of each connection is paced to ``rate`` bytes a second. The proxy runs in a
process of its own (spawned), so its work never holds the measured process's GIL."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from types import TracebackType

_BLOCK = 256 << 10


class Throttle:
    """``with Throttle(server_port, rate) as link:`` then point clients at ``link.url``;
    ``link.peak`` is the most connections that were open at once."""

    def __init__(self, server_port: int, rate: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._port: Synchronized[int] = context.Value("i", 0)
        self._peak: Synchronized[int] = context.Value("i", 0)
        self._ready = context.Event()
        self._process = context.Process(
            target=_serve, args=(server_port, rate, self._port, self._peak, self._ready), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port.value}"

    @property
    def peak(self) -> int:
        return self._peak.value

    def __enter__(self) -> Throttle:
        self._process.start()
        if not self._ready.wait(30):
            self._stop()
            raise RuntimeError("the throttling proxy did not start")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        self._process.terminate()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _serve(server_port: int, rate: int, port: Synchronized[int], peak: Synchronized[int], ready: Event) -> None:
    asyncio.run(_Proxy(server_port, rate, peak).run(port, ready))


class _Proxy:
    def __init__(self, server_port: int, rate: int, peak: Synchronized[int]) -> None:
        self.server_port, self.rate, self.peak, self.open = server_port, rate, peak, 0

    async def run(self, port: Synchronized[int], ready: Event) -> None:
        server = await asyncio.start_server(self.connection, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await server.serve_forever()

    async def connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.open += 1
        self.peak.value = max(self.peak.value, self.open)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.server_port)
        except OSError:
            self.open -= 1
            client_w.close()
            return
        try:
            await asyncio.gather(self.pace(client_r, server_w), self.pace(server_r, client_w))
        finally:
            self.open -= 1
            for w in (client_w, server_w):
                w.close()

    async def pace(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy ``source`` to ``sink`` at no more than ``rate`` bytes a second: a token bucket
        that holds one block, so a connection idle in a client's pool gains no burst."""
        credit, last = 0.0, time.monotonic()
        try:
            while data := await source.read(_BLOCK):
                now = time.monotonic()
                credit = min(_BLOCK, credit + (now - last) * self.rate) - len(data)
                last = now
                if credit < 0:
                    await asyncio.sleep(-credit / self.rate)
                    credit, last = 0.0, time.monotonic()
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except (ConnectionError, OSError):
            sink.close()
