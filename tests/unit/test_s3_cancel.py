"""Transfers stopped while the store holds its answers (``objstore``): a cancelled export
waits for a silent store ``_LINGER`` at most and aborts again once its parts are answered,
and no request of a stopped transfer is retried. Against an attacker's server
(``tests/fakehttp.py``), which can hold an answer as long as it likes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from boxvm import objstore
from tests.fakehttp import Fake, Handler, fakes, reply

PART = 8 << 20
CREATED = (
    b'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult><Bucket>bucket</Bucket>'
    b"<Key>key</Key><UploadId>up1</UploadId></InitiateMultipartUploadResult>"
)


class Store:
    """An S3 endpoint's route for one multipart upload: it takes each part's body, then
    answers as ``mode`` says: "silent" holds the answer until ``release``, "busy" says 503
    (which botocore retries) after a second. Every request is kept as (method, query,
    whether its body came whole, when)."""

    def __init__(self) -> None:
        self.mode = "silent"
        self.release = threading.Event()
        self.requests: list[tuple[str, str, bool, float]] = []

    def __call__(self, fake: Fake, h: Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        query = urllib.parse.urlsplit(h.path).query
        self.requests.append((h.command, query, len(body) == length, time.monotonic()))
        if h.command == "POST" and query == "uploads":
            reply(h, 200, CREATED)
        elif h.command == "PUT" and self.mode == "silent":
            self.release.wait(60)
            reply(h, 200, headers={"ETag": '"part"'})
        elif h.command == "PUT":
            time.sleep(1)
            reply(h, 503, b"<Error><Code>SlowDown</Code></Error>")
        else:
            reply(h, 204)

    def parts(self) -> list[str]:
        """The part requests, by their query, whole bodies only."""
        return [query for method, query, whole, _ in self.requests if method == "PUT" and whole]

    def aborts(self) -> list[float]:
        return [at for method, _, _, at in self.requests if method == "DELETE"]


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    route = Store()
    with fakes(route) as [fake]:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{fake.host}")
        monkeypatch.setenv(objstore.CONNECTIONS_ENV, "2")
        try:
            yield route
        finally:
            route.release.set()


async def two_parts_then_nothing() -> AsyncIterator[bytes]:
    for _ in range(2):
        yield os.urandom(PART)
    await asyncio.sleep(3600)
    yield b""


async def cancel_when_sent(store: Store, journal: Path) -> float:
    """Start an export, cancel it once the store has both parts' bodies; seconds the cancel took."""
    task = asyncio.create_task(objstore.upload(two_parts_then_nothing(), objstore.parse("s3://bucket/key"), journal))
    deadline = time.monotonic() + 30
    while len(store.parts()) < 2:
        assert time.monotonic() < deadline, store.requests
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - began


def part_threads(within: float = 5.0) -> list[threading.Thread]:
    deadline = time.monotonic() + within
    while (alive := [t for t in threading.enumerate() if t.name == "boxvm-s3-part"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


async def test_a_cancelled_export_waits_for_a_silent_store_only_so_long(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store has both parts whole and does not answer (botocore would wait 120 s, five
    times): the cancel aborts after ``_LINGER`` and keeps the journal; once the store
    answers the parts, the upload is aborted again and the journal entry goes."""
    monkeypatch.setattr(objstore, "_LINGER", 1.0)
    took = await cancel_when_sent(store, tmp_path)
    assert 0.9 < took < 4
    assert len(store.aborts()) == 1
    assert [p.name for p in (tmp_path / "s3uploads").iterdir()]  # the parts may still be stored
    store.release.set()
    assert part_threads() == []
    deadline = time.monotonic() + 5
    while list((tmp_path / "s3uploads").iterdir()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not list((tmp_path / "s3uploads").iterdir())
    assert len(store.aborts()) == 2 and store.aborts()[1] > store.aborts()[0]
    assert sorted(store.parts()) == ["uploadId=up1&partNumber=1", "uploadId=up1&partNumber=2"]  # none sent twice


async def test_a_cancelled_export_retries_no_part(store: Store, tmp_path: Path) -> None:
    """The store answers each part 503 a second after taking it: a cancelled export waits
    for those answers and retries nothing (botocore would, four more times), then aborts."""
    store.mode = "busy"
    took = await cancel_when_sent(store, tmp_path)
    assert took < 3
    assert part_threads() == []
    await asyncio.sleep(1.5)  # a retry's backoff is under a second
    assert sorted(store.parts()) == ["uploadId=up1&partNumber=1", "uploadId=up1&partNumber=2"]
    assert len(store.aborts()) == 1
    assert not list((tmp_path / "s3uploads").iterdir())
