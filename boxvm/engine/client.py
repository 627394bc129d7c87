"""Host-side client of a box's supervisor socket: requests and multiplexed channels.

One :class:`Connection` per box and process carries any number of concurrent channels.
Output is credited back to the agent only as the consumer takes it, so a process whose
output nobody reads blocks (as on a pipe) instead of growing memory here; the supervisor
closes the channel of a guest that ignores that window (``agentlink``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from pathlib import Path
from typing import Any

from boxvm.errors import EngineError, from_dict
from boxvm.guest import protocol as P


class Stream:
    """Chunks of one output stream, with the credit returned to the agent on consumption.

    Small frames are merged while unread, so the memory held is about the window's bytes
    however finely the guest splits them.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._chunks: deque[bytearray] = deque()
        self._eof = False
        self._wake = asyncio.Event()

    def _push(self, data: bytes) -> None:
        if self._chunks and len(self._chunks[-1]) < P.CHUNK:
            self._chunks[-1] += data
        else:
            self._chunks.append(bytearray(data))
        self._wake.set()

    def _close(self) -> None:
        self._eof = True
        self._wake.set()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._eof:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        data = bytes(self._chunks.popleft())
        self._channel._credit(len(data))
        return data

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])


class Channel:
    def __init__(self, conn: Connection, cid: int) -> None:
        self.conn = conn
        self.cid = cid
        self.stdout = Stream(self)
        self.stderr = Stream(self)
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._send_credit = P.WINDOW
        self._credit_wake = asyncio.Event()

    def _on_frame(self, ftype: int, payload: bytes) -> None:
        if ftype == P.STDOUT:
            self.stdout._push(payload)
        elif ftype == P.STDERR:
            self.stderr._push(payload)
        elif ftype == P.CREDIT:
            self._send_credit += P.unpack_credit(payload)
            self._credit_wake.set()
        elif ftype == P.RESULT:
            self.stdout._close()
            self.stderr._close()
            self._credit_wake.set()
            if not self.result.done():
                self.result.set_result(_result(payload))

    def _credit(self, amount: int) -> None:
        if not self.result.done():
            self.conn._send(P.pack_credit(self.cid, amount))

    async def write(self, data: bytes) -> None:
        """Send stdin, waiting for the agent's credit so neither side buffers more than a window."""
        view = memoryview(data)
        while view:
            while self._send_credit <= 0:
                if self.result.done():
                    return
                self._credit_wake.clear()
                await self._credit_wake.wait()
            n = min(len(view), self._send_credit, P.CHUNK)
            self._send_credit -= n
            self.conn._send(P.pack(self.cid, P.STDIN, bytes(view[:n])))
            view = view[n:]
            await self.conn._drain()

    def close_stdin(self) -> None:
        if not self.result.done():
            self.conn._send(P.pack(self.cid, P.EOF))

    def signal(self, signum: int) -> None:
        if not self.result.done():
            self.conn._send(P.pack_json(self.cid, P.SIGNAL, {"signal": int(signum)}))

    def resize(self, rows: int, cols: int) -> None:
        if not self.result.done():
            self.conn._send(P.pack_json(self.cid, P.RESIZE, {"rows": rows, "cols": cols}))

    async def wait(self) -> dict[str, Any]:
        result = await asyncio.shield(self.result)
        if "error" in result:
            raise from_dict(result["error"])
        return result


def _result(payload: bytes) -> dict[str, Any]:
    """A RESULT from the supervisor (which already checked the guest's): a JSON object."""
    try:
        result = json.loads(payload)
    except (ValueError, RecursionError):
        result = None
    if isinstance(result, dict):
        return result
    return {"error": {"type": "EngineError", "message": "the box sent an unreadable result"}}


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str) -> None:
        self._reader = reader
        self._writer = writer
        self._label = label
        self._channels: dict[int, Channel] = {}
        self._next = 1
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, sock: Path, label: str) -> Connection:
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise EngineError(f"box {label} is not running (its supervisor is gone)") from exc
        return cls(reader, writer, label)

    @property
    def closed(self) -> bool:
        return self._task.done()

    async def _read_loop(self) -> None:
        decoder = P.Decoder()
        try:
            while data := await self._reader.read(1 << 20):
                for cid, ftype, payload in decoder.feed(data):
                    chan = self._channels.get(cid)
                    if chan is not None:
                        if ftype == P.RESULT:
                            del self._channels[cid]
                        chan._on_frame(ftype, payload)
        except (ConnectionError, ValueError):
            pass
        finally:
            gone = {"error": {"type": "EngineError", "message": f"box {self._label} went away"}}
            for chan in self._channels.values():
                chan._on_frame(P.RESULT, json.dumps(gone).encode())
            self._channels.clear()

    def _send(self, frame: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(frame)

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def open_channel(self, request: dict[str, Any]) -> Channel:
        if self.closed:
            raise EngineError(f"box {self._label} went away")
        cid = self._next
        self._next += 1
        chan = Channel(self, cid)
        self._channels[cid] = chan
        self._send(P.pack_json(cid, P.OPEN, request))
        return chan

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """A request without streams: open a channel and wait for its result."""
        chan = self.open_channel({"op": op, **args})
        try:
            return await chan.wait()
        except asyncio.CancelledError:
            self._send(P.pack(chan.cid, P.CLOSE))
            raise

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
