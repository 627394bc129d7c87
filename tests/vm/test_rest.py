"""The REST server with real boxes: exec's token check, streams cut off, idempotency under
concurrent retries, many clients at once, and moving boxes between a host and a server.
All against a real ``boxvm serve`` (uvicorn) on loopback; the behaviour tests of the other
modules also run through it (``backends("local", "remote")``). What needs no VM (auth,
errors, idempotency replay, versions, the OpenAPI document) is in ``tests/unit/test_rest_*``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.paths import Home
from tests.conftest import TOKEN, Server
from tests.helpers import leftovers

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def remote(server: Server) -> AsyncIterator[boxvm.Runtime]:
    runtime = boxvm.Runtime.remote(server.url, token=TOKEN)
    yield runtime
    await runtime.close()


async def test_exec_needs_the_token_too(server: Server, remote: boxvm.Runtime, shared_box: boxvm.Box) -> None:
    from boxvm.backends.remote import RemoteBackend

    bad = RemoteBackend(server.url, "wrong")
    bad._checked = {"api": 1}  # skip the (refused) config call: the WebSocket itself must refuse
    with pytest.raises(boxvm.Unauthorized):
        await bad.spawn(shared_box.id, ["true"], env=None, cwd=None, user=None, timeout=None, tty=False, size=None)
    await bad.close()


async def test_idempotency_key_makes_one_box(server: Server, remote: boxvm.Runtime) -> None:
    body = {"name": "t-idem", "options": {"memory_mib": 256}}
    headers = {**AUTH, "Idempotency-Key": os.urandom(8).hex()}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        try:
            first, second, third = await asyncio.gather(*(http.post("/v1/boxes", json=body) for _ in range(3)))
            assert {r.status_code for r in (first, second, third)} == {201}
            assert first.json()["id"] == second.json()["id"] == third.json()["id"]
            assert [b.name for b in await remote.list()].count("t-idem") == 1
            other = await http.post("/v1/boxes", json={"name": "t-idem-2"})  # same key, other request
            assert other.status_code == 400 and "Idempotency-Key" in other.json()["error"]["message"]
        finally:
            await remote.remove("t-idem")


async def test_an_upload_cut_off_mid_stream_leaves_nothing(
    server: Server, remote: boxvm.Runtime, home: Home, tmp_path: Path
) -> None:
    box = await remote.create(name="t-rest-cut")
    try:
        archive = await box.export(tmp_path / "cut.boxsnap")
    finally:
        await remote.remove(box.id)
    data = archive.read_bytes()

    url = urlsplit(server.url)
    _reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        b"POST /v1/boxes/import?name=t-rest-cut-imp HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data[: len(data) // 2]
    )
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.close()
    for _ in range(100):  # the server notices the disconnect and cleans up
        await asyncio.sleep(0.1)
        if not leftovers(home, [server.pid]):
            break
    assert await remote.get("t-rest-cut-imp") is None and leftovers(home, [server.pid]) == []
    # and the whole archive, uploaded properly, imports
    again = await remote.import_box(archive, name="t-rest-cut-imp")
    await remote.remove(again.id)


async def test_a_client_leaving_mid_export_releases_the_box(server: Server, remote: boxvm.Runtime) -> None:
    box = await remote.create(name="t-rest-export-gone")
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, headers=AUTH) as http,
            http.stream("POST", f"/v1/boxes/{box.id}/export", json={"compress": False}) as r,
        ):
            assert r.status_code == 200
            async for _chunk in r.aiter_bytes():
                break  # and hang up
        for _ in range(100):
            if (await box.info()).status == boxvm.BoxStatus.CONFIGURED:
                break
            await asyncio.sleep(0.1)
        assert (await box.info()).status == boxvm.BoxStatus.CONFIGURED
        await box.snapshot.create("after")  # no operation is stuck on it
    finally:
        await remote.remove(box.id)


async def test_boxes_move_between_host_and_server(remote: boxvm.Runtime, local: LocalBackend, tmp_path: Path) -> None:
    here = boxvm.Runtime(backend=local)
    src = await here.create(boxvm.BoxOptions(image="boxvm/slim"), name="t-move-local")  # a fifth of the bytes to move
    moved = back = None
    try:
        await src.start()
        await src.exec(["sh", "-c", "mkdir -p /srv/app && echo from-host > /srv/app/note"])
        archive = await src.export(tmp_path / "up.boxsnap")  # running: point in time
        moved = await remote.import_box(archive, name="t-move-remote")
        await moved.start()
        assert (await moved.exec(["cat", "/srv/app/note"])).stdout == b"from-host\n"
        await moved.exec(["sh", "-c", "echo from-server >> /srv/app/note"])
        down = await moved.export(tmp_path / "down.boxsnap")  # streamed from the server
        back = await here.import_box(down, name="t-move-back")
        await back.start()
        assert (await back.exec(["cat", "/srv/app/note"])).stdout == b"from-host\nfrom-server\n"
    finally:
        for box in (src, moved, back):
            if box is not None:
                await here.remove(box.id, force=True)


async def test_twenty_clients_at_once(server: Server, remote: boxvm.Runtime) -> None:
    """20 clients, each with its own connection and box, exec and snapshot concurrently. The
    boxes are 19 forks of one memory snapshot, resumed running by one clone_many call."""
    base = await remote.create(boxvm.BoxOptions(image="boxvm/slim", memory_mib=256), name="t-many-base")
    boxes = [base]
    try:
        await base.start()
        await base.snapshot.create("warm", boxvm.SnapshotOptions(memory=True))
        boxes += await base.clone_many(19, boxvm.CloneOptions(from_snapshot="warm", start_after_clone=True))
        assert {(await b.info()).status for b in boxes} == {boxvm.BoxStatus.RUNNING}

        async def client(n: int, box_id: str) -> None:
            async with boxvm.Runtime.remote(server.url, token=TOKEN) as rt:
                box = await rt.get(box_id)
                assert box is not None
                r = await box.exec(["sh", "-c", f"echo {n} > /root/n; cat /root/n"])
                assert r.exit_code == 0 and r.stdout == f"{n}\n".encode()
                snap = await box.snapshot.create(f"s{n}")
                assert snap.consistency == "frozen"
                r = await box.exec(["cat", "/root/n"], stdin=b"")
                assert r.stdout == f"{n}\n".encode()
                names = sorted(s.name for s in await box.snapshot.list())
                assert names == (["s0", "warm"] if n == 0 else [f"s{n}"])  # the forks have none of the base's

        await asyncio.gather(*(client(n, b.id) for n, b in enumerate(boxes)))
    finally:
        await asyncio.gather(*(remote.remove(b.id, force=True) for b in boxes))
