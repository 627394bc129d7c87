"""Object storage as a hostile or broken S3 endpoint answers it (``tests/fakehttp.py``): each
odd reply fails the transfer as a clear boxvm error of bounded length, naming no path of
this host, sent once (no redirect loop), and leaves no journal entry to retry forever."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from boxvm import objstore
from boxvm.errors import StorageError
from tests.fakehttp import Fake, Handler, fakes, reply
from tests.helpers import rss_mib

URL = objstore.parse("s3://bucket/key")
CREATED = b"<InitiateMultipartUploadResult><UploadId>up1</UploadId></InitiateMultipartUploadResult>"


class Store:
    """Answers as ``mode`` says; every request is kept as (method, query)."""

    def __init__(self) -> None:
        self.mode = ""
        self.requests: list[tuple[str, str]] = []

    def __call__(self, fake: Fake, h: Handler) -> None:
        method, _, query = h.command, *h.path.partition("?")[::2]
        self.requests.append((method, query))
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        if self.mode == "redirect":
            reply(h, 301, b"", {"Location": "http://127.0.0.1:9/elsewhere"})
        elif (self.mode in ("huge reply", "trickled reply") and method == "POST") or self.mode == "huge error":
            huge = self.mode != "trickled reply"  # 64 MiB of it, in pieces: the test measures the client's memory
            pieces = [b" " * (1 << 20)] * 64 if huge else [bytes([b]) for b in CREATED]
            h.send_response(500 if self.mode == "huge error" else 200)
            h.send_header("Content-Length", str(sum(map(len, pieces))))
            h.end_headers()
            with contextlib.suppress(OSError):  # until the client gives up on it
                for piece in pieces:
                    h.wfile.write(piece)
                    h.wfile.flush()
                    time.sleep(0 if huge else 0.3)
        elif self.mode == "no upload id" and method == "POST":
            reply(h, 200, b"<InitiateMultipartUploadResult></InitiateMultipartUploadResult>")
        elif self.mode == "huge code":
            reply(h, 400, b"<Error><Code>" + b"A" * 200_000 + b"</Code></Error>")
        elif self.mode == "no length" and method == "HEAD":
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
        elif self.mode == "refuse aborts" and method == "DELETE":
            reply(h, 503, b"<Error><Code>SlowDown</Code></Error>")
        elif self.mode == "drop aborts" and method == "DELETE":
            h.close_connection = True  # no reply at all: botocore's error then has no response
            h.connection.shutdown(socket.SHUT_RDWR)
        elif method == "POST" and query == "uploads":
            reply(h, 200, CREATED)
        elif method == "DELETE":
            reply(h, 204)
        else:
            reply(h, 500, b"<Error><Code>InternalError</Code></Error>")


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    answers = Store()
    with fakes(answers) as [fake]:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "y"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{fake.host}")
        yield answers


async def one_part() -> AsyncIterator[bytes]:
    yield b"archive"


@pytest.mark.parametrize("mode", ["redirect", "no upload id", "huge code"])
async def test_an_odd_reply_fails_an_export_clearly_and_once(store: Store, tmp_path: Path, mode: str) -> None:
    """A redirect (botocore took it for a region hint and asked again ~80 times), a reply
    with no upload id (a KeyError before), an error code of 200 KB (echoed whole)."""
    store.mode = mode
    with pytest.raises(StorageError) as failed:
        await objstore.upload(one_part(), URL, tmp_path)
    assert len(failed.value.message) < 200 and str(tmp_path) not in failed.value.message
    assert store.requests[:1] == [("POST", "uploads")] and len(store.requests) <= 2  # (and an abort)
    assert not list((tmp_path / "s3uploads").glob("*"))


@pytest.mark.parametrize("mode", ["redirect", "no length"])
async def test_an_odd_reply_to_a_head_fails_clearly(store: Store, mode: str) -> None:
    """A redirect (a loop of ~80 HEADs before), no Content-Length (a KeyError before)."""
    store.mode = mode
    with pytest.raises(StorageError) as failed:
        await objstore.size(URL)
    assert len(failed.value.message) < 200 and len(store.requests) == 1


async def test_a_journal_that_cannot_be_written_names_no_path(store: Store, tmp_path: Path) -> None:
    (tmp_path / "s3uploads").write_text("a file where the journal's folder goes")
    with pytest.raises(StorageError, match="cannot journal the upload") as failed:
        await objstore.upload(one_part(), URL, tmp_path)
    assert str(tmp_path) not in failed.value.message
    assert store.requests == [("POST", "uploads"), ("DELETE", "uploadId=up1")]


async def test_the_journal_recovery_is_bounded(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries of dead processes whose store refuses the abort: each is tried once (no
    retries), all within ``_RECOVERY_S``, and given up after ``_RECOVERY_DAYS``; an entry
    without an upload id is dropped (a KeyError out of every export before)."""
    store.mode = "refuse aborts"
    alive = {999999: False}.get
    folder = tmp_path / "s3uploads"
    folder.mkdir()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for n in range(3):
        (folder / f"999999-{n}").write_text(
            f'{{"endpoint": "{endpoint}", "bucket": "bucket", "key": "k{n}", "upload_id": "u{n}"}}'
        )
    (folder / "999999-9").write_text(f'{{"endpoint": "{endpoint}", "bucket": "bucket", "key": "k"}}')
    began = time.monotonic()
    objstore.recover(tmp_path, alive)
    assert time.monotonic() - began < 10 and store.requests.count(("DELETE", "uploadId=u0")) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["999999-0", "999999-1", "999999-2"]
    old = time.time() - (objstore._RECOVERY_DAYS + 1) * 86400
    os.utime(folder / "999999-1", (old, old))
    objstore.recover(tmp_path, alive)
    assert sorted(p.name for p in folder.iterdir()) == ["999999-0", "999999-2"]
    monkeypatch.setattr(objstore, "_RECOVERY_S", 0.0)
    store.requests.clear()
    objstore.recover(tmp_path, alive)  # out of time at once: the rest waits for the next export
    assert len(store.requests) <= 1


async def test_an_abort_without_an_answer_fails_no_export(store: Store, tmp_path: Path) -> None:
    """A dead process's upload whose abort gets no answer at all (botocore's error carries no
    response: an AttributeError out of every export from the home before): the entry stays
    for the next export, and this export goes on."""
    store.mode = "drop aborts"
    folder = tmp_path / "s3uploads"
    folder.mkdir()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    (folder / "999999-0").write_text(f'{{"endpoint": "{endpoint}", "bucket": "b", "key": "k", "upload_id": "u"}}')
    objstore.recover(tmp_path, {999999: False}.get)
    assert [p.name for p in folder.iterdir()] == ["999999-0"]


async def test_a_reply_is_read_within_a_size_and_a_time(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore reads a reply that is not an object's body whole: a 64 MiB answer to an
    upload's start grew this process by ~200 MiB, and one sent a byte at a time held the call
    for as long as it trickled (botocore's timeout is per socket read). Each now fails at once,
    clearly and without a retry."""
    store.mode = "huge reply"
    objstore.client()  # made before the baseline: a first client costs ~25 MiB
    before = rss_mib()
    with pytest.raises(StorageError, match="reply of over 4 MiB") as failed:
        await objstore.upload(one_part(), URL, tmp_path)
    assert rss_mib() - before < 40 and len(failed.value.message) < 200
    assert store.requests[0] == ("POST", "uploads") and store.requests.count(("POST", "uploads")) == 1
    store.mode, store.requests = "huge error", []  # an error's body, also to a GET (whose body is streamed)
    with pytest.raises(StorageError, match="reply of over 4 MiB"):
        objstore.client().get_object(Bucket=URL.bucket, Key=URL.key)
    assert rss_mib() - before < 40 and store.requests == [("GET", "")]
    monkeypatch.setattr(objstore, "_REPLY_S", 1.0)
    store.mode, store.requests = "trickled reply", []
    began = time.monotonic()
    with pytest.raises(StorageError, match="too slowly"):
        await objstore.upload(one_part(), URL, tmp_path)
    assert time.monotonic() - began < 1.0 + 2 * objstore._WATCH_S + 2
    assert store.requests.count(("POST", "uploads")) == 1
    assert not list((tmp_path / "s3uploads").glob("*"))
