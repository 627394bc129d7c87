"""``objstore.PartBody``: a part's chunks as the seekable file botocore reads (signature,
checksum, send), handing out the chunks themselves or views of them, never copies; and
the S3 client's checksum choice per scheme. No server: ``tests/vm/test_s3.py`` uploads."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boxvm import objstore
from boxvm.streams import pread_views

_chunks = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@settings(max_examples=200, deadline=None)
@given(chunks=_chunks, sizes=st.lists(st.one_of(st.none(), st.integers(-1, 400)), min_size=1, max_size=30))
def test_reads_of_any_size_give_the_bytes_in_order_without_copies(chunks: list[bytes], sizes: list[int | None]) -> None:
    body, whole = objstore.PartBody(chunks), b"".join(chunks)
    got = bytearray()
    for i in range(200):
        piece = body.read(sizes[i % len(sizes)])
        if not piece:
            if sizes[i % len(sizes)] != 0:
                break
            continue
        # the chunk itself, or a view of one: nothing was copied
        assert any(piece is c for c in chunks) or (
            isinstance(piece, memoryview) and any(piece.obj is c for c in chunks)
        )
        got += piece
        assert body.tell() == len(got)
    else:
        got += b"".join(bytes(p) for p in iter(lambda: body.read(1 << 20), b""))
    assert got == whole
    assert body.read() == b"" and body.tell() == len(whole)


def test_seek_and_tell_behave_as_botocore_needs() -> None:
    """botocore measures the length (seek to the end), hashes from the start, rewinds, and
    rewinds again for a retry."""
    chunks = [b"abc", b"defgh", b"ij"]
    body = objstore.PartBody(chunks)
    assert body.seekable()
    assert body.seek(0, io.SEEK_END) == 10 and body.tell() == 10
    assert body.seek(0) == 0
    assert body.read(1 << 20) is chunks[0]
    assert bytes(body.read(2)) == b"de" and bytes(body.read()) == b"fgh"
    assert body.seek(-3, io.SEEK_CUR) == 5 and bytes(body.read(10)) == b"fgh"
    assert body.seek(4) == 4 and bytes(body.read(1)) == b"e"
    for _ in range(2):  # a retry reads it all again
        body.seek(0)
        assert b"".join(bytes(p) for p in iter(lambda: body.read(1 << 20), b"")) == b"abcdefghij"
    empty = objstore.PartBody([])
    assert empty.read() == b"" and empty.seek(0, io.SEEK_END) == 0


def test_the_crc32_is_left_out_only_where_the_signature_covers_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over plain HTTP botocore signs each body's SHA-256, so its default CRC32 of the same
    bytes is dropped; over HTTPS (an unsigned body) it stays, as botocore's default."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    plain = objstore._client(("plain",), "http://127.0.0.1:9")
    secure = objstore._client(("secure",), "https://s3.example.com")
    assert plain.meta.config.request_checksum_calculation == "when_required"
    assert secure.meta.config.request_checksum_calculation == "when_supported"


def test_pread_views_reuse_one_buffer_and_stop_at_the_end(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "data")
    data = os.urandom(10_000)
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = memoryview(bytearray(4096))
        pieces = [bytes(v) for v in pread_views(fd, 100, 9_000, buf)]
        assert [len(p) for p in pieces] == [4096, 4096, 808] and b"".join(pieces) == data[100:9_100]
        views = list(pread_views(fd, 0, 5000, buf))
        assert all(v.obj is buf.obj for v in views)  # one buffer, overwritten piece by piece
        with pytest.raises(EOFError):
            list(pread_views(fd, 9_000, 2_000, buf))
    finally:
        os.close(fd)
