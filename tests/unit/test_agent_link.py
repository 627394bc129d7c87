"""The supervisor's end of the agent channel (``engine/agentlink.py``) over a real socket pair."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest

from boxvm.engine.agentlink import AgentLink
from boxvm.guest import protocol as P


async def _stop(tasks: list[asyncio.Task[None]], *ends: asyncio.StreamWriter | socket.socket) -> None:
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)
    for end in ends:
        end.close()


async def test_a_held_link_neither_sends_nor_reads_until_released() -> None:
    """``hold``: a capture's pause, during which QEMU must move no agent data in guest RAM:
    frames to the guest wait (in order), and nothing the guest sent is read; ``release``
    sends them and reads again."""
    host, guest = socket.socketpair()
    guest.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=host)
    hellos: list[dict[str, object]] = []
    link = AgentLink(hellos.append, lambda _why: None)
    tasks = link.attach(reader, writer)
    try:
        link.hold()
        pings = [asyncio.ensure_future(link.request({"op": "ping", "n": n}, 5)) for n in range(3)]
        guest.send(P.pack_json(0, P.HELLO, {"version": 1, "uptime": 1.0}))
        await asyncio.sleep(0.2)
        with pytest.raises(BlockingIOError):
            guest.recv(1 << 16)  # nothing sent while held
        assert hellos == []  # nothing read while held
        link.release()
        await asyncio.sleep(0.2)
        assert hellos == [{"version": 1, "uptime": 1.0}]
        frames = P.Decoder().feed(guest.recv(1 << 16))
        assert [(t, json.loads(p)["n"]) for _g, t, p in frames] == [(P.OPEN, 0), (P.OPEN, 1), (P.OPEN, 2)]
        for gid, _t, _p in frames:
            guest.send(P.pack_json(gid, P.RESULT, {"ok": True}))
        assert [await p for p in pings] == [{"ok": True}] * 3
    finally:
        await _stop(tasks, writer, guest)


async def test_a_copy_stalled_behind_empty_frames_still_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy out whose guest side sends nothing but empty output frames and zero credits,
    which carry no progress: it times out as a silent one does (they kept it alive forever)."""
    from boxvm.engine import agentlink

    monkeypatch.setattr(agentlink, "IDLE_TIMEOUT", 1.0)
    monkeypatch.setattr(agentlink, "TICK", 0.1)
    host, guest = socket.socketpair()
    mine, theirs = socket.socketpair()  # the supervisor's client connection: its far end read here
    reader, writer = await asyncio.open_unix_connection(sock=host)
    _creader, cwriter = await asyncio.open_unix_connection(sock=mine)
    link = AgentLink(lambda _hello: None, lambda _why: None)
    tasks = link.attach(reader, writer)
    client = agentlink.Client(cwriter)
    try:
        request = {"op": "get", "path": "/root"}
        link.open(client, 1, request, json.dumps(request).encode())
        link.from_client(client, 1, P.EOF, b"")
        await asyncio.sleep(0.1)
        gid = P.Decoder().feed(guest.recv(1 << 16))[0][0]
        began = asyncio.get_running_loop().time()
        while client.routes and asyncio.get_running_loop().time() - began < 5:
            guest.send(P.pack(gid, P.STDOUT, b"") + P.pack_credit(gid, 0))
            await asyncio.sleep(0.1)
        assert not client.routes, "the stalled copy was kept alive"
        theirs.setblocking(False)
        results = [p for _c, t, p in P.Decoder().feed(theirs.recv(1 << 16)) if t == P.RESULT]
        assert "stalled" in json.loads(results[0])["error"]["message"]
    finally:
        await _stop(tasks, writer, cwriter, guest, theirs)
