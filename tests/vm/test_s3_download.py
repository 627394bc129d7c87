"""An import's download (``objstore.Download``): from a store on another host, ranged GETs in
parallel, handed over in order and pinned to one version of the object; against the tests'
real SeaweedFS, and against a hostile server that answers with other ranges or short bodies."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from boxvm import objstore, streams
from boxvm.errors import InvalidArgument, StorageError
from tests.fakehttp import Fake, Handler, fakes, reply
from tests.s3server import S3Server

RANGE = 64 << 10


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 64 KiB read 16 KiB at a time, 3 in flight: many pieces from a small object."""
    monkeypatch.setattr(objstore, "_RANGE", RANGE)
    monkeypatch.setattr(objstore, "_READ", 16 << 10)
    monkeypatch.setenv(objstore.CONNECTIONS_ENV, "3")


def range_threads(within: float = 5.0) -> list[threading.Thread]:
    """The download's range threads still alive after ``within`` seconds (a download left
    early does not wait for its GETs: they end at their next read, or once their reply comes)."""
    deadline = time.monotonic() + within
    while (alive := [t for t in threading.enumerate() if t.name.startswith("boxvm-s3-range")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return alive


def fetch(url: str) -> Iterator[bytes]:
    return objstore.download(objstore.parse(url))._fetch()


def test_the_number_of_connections_follows_where_the_store_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's number (one GET, 3 parts) with a store on this host, which shares the CPU
    more requests would cost; ten with any other; ``BOXVM_S3_CONNECTIONS`` overrides both and
    is checked."""

    class Client:
        def __init__(self, endpoint: str) -> None:
            self.meta = type("Meta", (), {"endpoint_url": endpoint})

    monkeypatch.delenv(objstore.CONNECTIONS_ENV, raising=False)
    for local in ("http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000", "http://127.8.0.1"):
        assert objstore.connections(Client(local), 3) == 3
    for remote in ("https://s3.us-east-1.amazonaws.com", "http://10.0.0.5:9000", "http://minio.internal"):
        assert objstore.connections(Client(remote), 3) == 10
    monkeypatch.setenv(objstore.CONNECTIONS_ENV, "4")
    assert objstore.connections(Client("http://127.0.0.1:9000"), 3) == 4
    for bad in ("0", "33", "-1", "four", ""):
        monkeypatch.setenv(objstore.CONNECTIONS_ENV, bad)
        with pytest.raises(InvalidArgument, match=objstore.CONNECTIONS_ENV):
            objstore.connections(Client("http://127.0.0.1:9000"), 3)


@pytest.mark.parametrize("size", [0, 1, RANGE - 1, RANGE, RANGE + 1, 7 * RANGE + 5])
def test_ranged_gets_give_the_object_whole_and_in_order(s3: S3Server, small_ranges: None, size: int) -> None:
    """Every size around the piece boundaries, empty included: the bytes come back exactly,
    and no range thread outlives the download."""
    data = os.urandom(size)
    key = f"ranges/{size}-{os.urandom(3).hex()}"
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)
    assert b"".join(fetch(f"s3://{s3.bucket}/{key}")) == data
    assert range_threads() == []


def test_an_object_replaced_mid_download_fails_it(s3: S3Server, small_ranges: None) -> None:
    """The object is replaced once its first bytes have arrived: the next piece asked for
    carries the first one's ETag, so the download fails clearly instead of mixing two
    archives (which the import's checksum would refuse later, as a corrupt archive)."""
    client, key = s3.client(), f"ranges/replaced-{os.urandom(3).hex()}"
    client.put_object(Bucket=s3.bucket, Key=key, Body=os.urandom(8 * RANGE))
    chunks = fetch(f"s3://{s3.bucket}/{key}")
    next(chunks)  # pieces 0-2 are asked for; piece 3 only once piece 0 is taken
    client.put_object(Bucket=s3.bucket, Key=key, Body=os.urandom(8 * RANGE))
    with pytest.raises(StorageError, match="changed while it was imported"):
        for _ in chunks:
            pass
    assert range_threads() == []


def test_a_download_closed_midway_leaves_the_client_working(s3: S3Server, small_ranges: None) -> None:
    """An import cancelled mid-download, several times: its GETs end (their sockets shut
    down), and the next download through the same client's connection pool still gets
    the object exactly."""
    data = os.urandom(16 * RANGE)
    key = f"ranges/closed-{os.urandom(3).hex()}"
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)
    for _ in range(3):
        chunks = fetch(f"s3://{s3.bucket}/{key}")
        next(chunks)
        chunks.close()
    assert range_threads() == []
    assert b"".join(fetch(f"s3://{s3.bucket}/{key}")) == data


def whole(size: int) -> bytes:
    """What the hostile server holds: byte i is (i // RANGE) % 251."""
    return b"".join(bytes([n % 251]) * min(RANGE, size - at) for n, at in enumerate(range(0, size, RANGE)))


class Hostile:
    """An S3 endpoint's route (``tests/fakehttp.py``) that answers GETs as ``mode`` says:
    lying about the range it sends, ignoring ranges, giving only a weak ETag, stalling in
    the middle of a piece or before any reply, or slow to refuse."""

    def __init__(self) -> None:
        self.mode = ""
        self.size = 4 * RANGE
        self.ranged: list[bool] = []  # per GET: whether it asked for a range
        self.release = threading.Event()  # ends a stall

    def __call__(self, fake: Fake, h: Handler) -> None:
        asked = h.headers.get("Range", "")
        self.ranged.append(bool(asked))
        first, last = (int(x) for x in asked.removeprefix("bytes=").split("-")) if asked else (0, self.size - 1)
        last = min(last, self.size - 1)
        if (self.mode == "silent" and first > 0) or self.mode == "silent first":  # no reply at all
            self.release.wait(60)
            return
        if self.mode == "busy" and first > 0:  # a second, then 503 (which botocore retries)
            time.sleep(1)
            reply(h, 503, b"<Error><Code>SlowDown</Code></Error>")
            return
        body = whole(self.size)[first : last + 1]
        status, claim, etag = 206 if asked else 200, f"bytes {first}-{last}/{self.size}", '"hostile"'
        if self.mode == "other range":
            claim = f"bytes {first + 1}-{last + 1}/{self.size}"
        elif self.mode == "short range" and first > 0:
            body = body[: len(body) // 2]
            claim = f"bytes {first}-{first + len(body) - 1}/{self.size}"
        elif self.mode == "short body" and first > 0:
            body = body[: len(body) // 2]  # the range claimed, fewer bytes sent (and said)
        elif self.mode == "huge size":
            claim = f"bytes {first}-{last}/{10**18}"
        elif self.mode == "ignores ranges":
            status, body = 200, whole(self.size)
        elif self.mode == "weak etag":
            etag = 'W/"hostile"'
        headers = {"ETag": etag, **({"Content-Range": claim} if status == 206 else {})}
        if self.mode == "trickle" and first > 0:  # the whole length said, then a byte every 0.2 s
            h.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                h.send_header(k, v)
            h.end_headers()
            for byte in body:
                if self.release.wait(0.2):
                    return
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
            return
        if self.mode == "stall" and first > 0:  # the whole length said, half a piece sent, then nothing
            reply(h, status, body[: len(body) // 2], {**headers, "Content-Length": str(len(body))})
            h.wfile.flush()
            self.release.wait(60)
            return
        reply(h, status, body, headers)


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch, small_ranges: None) -> Iterator[Hostile]:
    store = Hostile()
    with fakes(store) as [fake]:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{fake.host}")
        try:
            yield store
        finally:
            store.release.set()


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("other range", "another range"),
        ("short range", "another range"),
        ("short body", "cut a piece .* short"),
        ("huge size", "another range"),
    ],
)
def test_a_server_lying_about_ranges_fails_the_download(hostile: Hostile, mode: str, error: str) -> None:
    """Another range than asked for, a piece cut short, a size that does not match the
    pieces: a clear StorageError, and every range thread is gone."""
    hostile.mode = mode
    with pytest.raises(StorageError, match=error):
        for _ in fetch("s3://bucket/key"):
            pass
    assert range_threads() == []


def test_a_store_that_trickles_fails_the_download_in_time(hostile: Hostile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each piece after the first comes a byte every 0.2 s, which no read timeout (per socket
    read) ever ends: a read of the download that takes longer than ``_STALL_S`` fails it."""
    monkeypatch.setattr(objstore, "_STALL_S", 1.0)
    monkeypatch.setattr(objstore, "_WATCH_S", 0.1)
    hostile.mode = "trickle"
    began = time.monotonic()
    with pytest.raises(StorageError, match="too slowly"):
        for _ in fetch("s3://bucket/key"):
            pass
    assert time.monotonic() - began < 10
    assert range_threads() == []


def test_a_server_that_ignores_ranges_is_read_as_one_stream(hostile: Hostile) -> None:
    """A store that answers a ranged GET with the whole object (200) is read whole."""
    hostile.mode = "ignores ranges"
    assert b"".join(fetch("s3://bucket/key")) == whole(hostile.size)
    assert hostile.ranged == [True]


def test_a_weak_etag_makes_it_one_get(hostile: Hostile) -> None:
    """``If-Match`` never matches a weak ETag, and nothing else would hold the pieces to one
    version: the object is read with one GET of the whole, and comes back whole."""
    hostile.mode = "weak etag"
    assert b"".join(fetch("s3://bucket/key")) == whole(hostile.size)
    assert hostile.ranged == [True, False]
    assert range_threads() == []


def test_closing_an_import_does_not_wait_for_a_stalled_store(hostile: Hostile) -> None:
    """Every piece after the first stalls halfway (the server keeps its connections open):
    closing the import's reader, as a cancelled import does, returns at once instead of
    waiting out the read timeout (120 s), and the range threads end."""
    hostile.mode = "stall"
    reader = objstore.download(objstore.parse("s3://bucket/key")).open()
    got = b""
    while len(got) < RANGE:
        got += reader.read(RANGE - len(got))
    assert got == whole(hostile.size)[:RANGE]
    time.sleep(0.3)  # the other pieces' halves arrive, then nothing
    began = time.monotonic()
    reader.close()
    assert time.monotonic() - began < 5
    assert range_threads() == []


def test_closing_an_import_does_not_wait_for_a_store_that_never_answers(
    hostile: Hostile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reply at all to the pieces after the first, then to the first GET itself: a closed
    import's reader returns at once in the first case (the reader waits on a piece, which
    the abort ends) and after ``ReadAhead._LINGER`` in the second (a request no stop
    reaches); what is left waiting is daemon threads, which end with their requests."""
    hostile.mode = "silent"
    reader = objstore.download(objstore.parse("s3://bucket/key")).open()
    assert reader.read(1)
    began = time.monotonic()
    reader.close()
    assert time.monotonic() - began < 5
    assert all(t.daemon for t in range_threads(within=0))
    monkeypatch.setattr(streams.ReadAhead, "_LINGER", 1.0)
    hostile.mode = "silent first"
    reader = objstore.download(objstore.parse("s3://bucket/key")).open()
    time.sleep(0.3)
    began = time.monotonic()
    reader.close()
    assert time.monotonic() - began < 3
    assert all(t.daemon for t in threading.enumerate() if t.name == "boxvm-s3-download")
    hostile.release.set()
    assert range_threads(within=10) == []


def test_a_closed_import_retries_no_get(hostile: Hostile) -> None:
    """The store refuses every piece after the first with 503, a second after being asked:
    an import closed meanwhile sends no GET after those (botocore would retry each, four
    more times), and its range threads end with the refusals."""
    hostile.mode = "busy"
    reader = objstore.download(objstore.parse("s3://bucket/key")).open()
    assert reader.read(1)
    deadline = time.monotonic() + 10
    while len(hostile.ranged) < 4 and time.monotonic() < deadline:  # every piece asked for (the first is read)
        time.sleep(0.02)
    reader.close()
    assert range_threads() == []
    time.sleep(1.5)  # a retry's backoff is under a second
    assert len(hostile.ranged) == 4
