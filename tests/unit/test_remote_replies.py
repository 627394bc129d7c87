"""A client of a hostile boxvm server (``Runtime.remote``; a migration's driver talks to
two): a reply is read to a bound, not into memory without end, and an error envelope
of the wrong shape, or JSON that is not, fails as a BoxvmError. Against an attacker's
HTTP server (``tests/fakehttp.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from boxvm import wire
from boxvm.backends import remote
from boxvm.backends.base import ProcessChannel
from boxvm.backends.remote import RemoteBackend
from boxvm.errors import BoxvmError, EngineError
from tests.fakehttp import Fake, Handler, fakes, reply

JSON = {"Content-Type": "application/json"}
CONFIG = json.dumps({"api": wire.API_VERSION, "version": "hostile", "capabilities": list(wire.CAPABILITIES)}).encode()


class Server:
    """Answers ``/v1/config`` truthfully and a few paths as an attacker would; counts the
    bytes it sent of endless bodies."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, fake: Fake, h: Handler) -> None:
        path = h.path.split("?")[0]
        if path == "/v1/config":
            reply(h, 200, CONFIG, JSON)
        elif path in ("/v1/boxes", "/v1/boxes/endless-error"):
            h.send_response(200 if path == "/v1/boxes" else 404)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(1 << 40))
            h.end_headers()
            block = b"[" + b" " * (64 << 10)
            while True:  # until the client hangs up
                h.wfile.write(block)
                self.sent += len(block)
        elif path == "/v1/boxes/odd-error":
            reply(
                h, 500, json.dumps({"error": ["not", "an", "envelope"]}).encode(), {"Content-Type": "application/json"}
            )
        elif path == "/v1/boxes/not-json":
            reply(h, 200, b"{not json", JSON)
        elif path == "/v1/boxes/a-list":  # well-formed JSON of the wrong shape, for a box and for a list
            reply(h, 200, json.dumps(["id", "name"]).encode(), JSON)
        elif path == "/v1/images":
            reply(h, 200, json.dumps({"not": "a list"}).encode(), JSON)
        elif path == "/v1/templates":
            reply(h, 200, json.dumps([{"name": 7}]).encode(), JSON)
        else:
            reply(h, 404, b"")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, str]]:
    monkeypatch.setattr(remote, "_REPLY_MAX", 1 << 20)
    route = Server()
    with fakes(route) as [fake]:
        yield route, f"http://{fake.host}"


async def test_an_endless_reply_is_refused_at_its_bound(server: tuple[Server, str]) -> None:
    """A body that never ends: as a list of boxes, refused past the bound (1 MiB here); as
    an error, cut at 64 KiB with its status kept. Each connection is dropped long before the
    server is done."""
    route, url = server
    client = RemoteBackend(url, "token")
    try:
        with pytest.raises(EngineError, match="over 1048576 bytes"):
            await client.list()
        with pytest.raises(BoxvmError, match="HTTP 404 from the server"):  # an error's first 64 KiB, its status kept
            await client.get("endless-error")
    finally:
        await client.close()
    assert route.sent < 64 << 20  # the server found the client gone


async def test_misshapen_replies_fail_as_boxvm_errors(server: tuple[Server, str]) -> None:
    """An error whose envelope is not an object, JSON that does not parse, and well-formed
    JSON of the wrong shape (a list for a box, an object for a list, a field missing):
    BoxvmErrors, not an AttributeError, KeyError or TypeError from deep inside the client."""
    _, url = server
    client = RemoteBackend(url, "token")
    try:
        with pytest.raises(BoxvmError, match="malformed error"):
            await client.get("odd-error")
        with pytest.raises(EngineError, match="malformed JSON"):
            await client.get("not-json")
        with pytest.raises(EngineError, match="malformed box info"):
            await client.get("a-list")
        with pytest.raises(EngineError, match="dict where a list was due"):
            await client.image_list()
        with pytest.raises(EngineError, match="malformed template info"):
            await client.template_list()
    finally:
        await client.close()


# An exec's WebSocket from an attacker's server: what it sends first, then during the process.
HOSTILE_EXEC: dict[str, list[str | bytes]] = {
    "binary-first": [b"\x01hello"],
    "not-json": ["{not json"],
    "a-list": ['["started"]'],
    "no-type": ['{"kind": "started"}'],
    "not-started": ['{"type": "exit", "exit_code": 0}'],
    "odd-error": ['{"type": "error", "error": ["not", "an", "envelope"]}'],
    "no-stream": ['{"type": "started"}', b"\x07junk"],
    "empty-frame": ['{"type": "started"}', b""],
    "bad-control": ['{"type": "started"}', "[1, 2]"],
    "exit-code-text": ['{"type": "started"}', '{"type": "exit", "exit_code": "zero"}'],
    "exit-code-bool": ['{"type": "started"}', '{"type": "exit", "exit_code": true}'],
    "two-exits": ['{"type": "started"}', '{"type": "exit", "exit_code": 3}', '{"type": "exit", "exit_code": 4}'],
    "exit-code-huge": ['{"type": "started"}', '{"type": "exit", "exit_code": 1000000}'],
    "deep-first": ["[" * 100_000],
    "deep-later": ['{"type": "started"}', "[" * 100_000],
    "output-after-exit": ['{"type": "started"}', '{"type": "exit", "exit_code": 0}', b"\x01late"],
    "closes-at-once": [],
}


@pytest.fixture
async def exec_server() -> AsyncIterator[str]:
    """A WebSocket server that answers ``/v1/config`` truthfully, then sends the messages
    ``HOSTILE_EXEC`` names for the box id of the exec's path."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.datastructures import Headers
    from websockets.http11 import Request, Response

    def config(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/v1/config"):
            return Response(200, "OK", Headers({"Content-Type": "application/json"}), CONFIG)
        if "redirect" in request.path:  # a handshake answered by a redirect to another scheme
            return Response(302, "Found", Headers({"Location": "ftp://example.invalid/"}), b"")
        return None

    async def handler(ws: ServerConnection) -> None:
        if ws.request.path.split("/")[3] == "closes-at-once":
            return
        await ws.recv()  # the exec request
        for message in HOSTILE_EXEC[ws.request.path.split("/")[3]]:
            await ws.send(message)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=config) as server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def spawn(client: RemoteBackend, case: str) -> ProcessChannel:
    return await client.spawn(case, ["true"], env=None, cwd=None, user=None, timeout=None, tty=False, size=None)


async def test_a_hostile_exec_fails_as_a_boxvm_error(exec_server: str) -> None:
    """Every malformed message of an exec's WebSocket, first or later, is an EngineError (or
    the error it stands for) and the connection is closed: not a ValueError, KeyError,
    IndexError or AttributeError from the client's reader, nor a wait that never ends."""
    client = RemoteBackend(exec_server, "token")
    try:
        for case in ("binary-first", "not-json", "a-list", "no-type", "not-started", "deep-first"):
            with pytest.raises(EngineError, match="malformed exec message"):
                await spawn(client, case)
        with pytest.raises(BoxvmError, match="malformed error"):
            await spawn(client, "odd-error")
        with pytest.raises(EngineError, match="closed the exec connection"):
            await spawn(client, "closes-at-once")
        with pytest.raises(EngineError, match="handshake"):
            await spawn(client, "redirect")
        cases = ("no-stream", "empty-frame", "bad-control", "exit-code-text", "exit-code-bool", "exit-code-huge")
        for case in (*cases, "deep-later"):
            process = await spawn(client, case)
            with pytest.raises(EngineError, match="malformed exec message"):
                await asyncio.wait_for(process.wait(), 10)
            assert [c async for c in process.stdout] == []  # the streams end too
        process = await spawn(client, "two-exits")
        assert await asyncio.wait_for(process.wait(), 10) == {"exit_code": 3, "timed_out": False}
        process = await spawn(client, "output-after-exit")
        assert await asyncio.wait_for(process.wait(), 10) == {"exit_code": 0, "timed_out": False}
        assert [c async for c in process.stdout] == []  # what follows an exit is dropped
    finally:
        await client.close()
