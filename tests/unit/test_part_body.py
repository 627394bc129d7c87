"""``objstore.PartBody``: a part's chunks as the seekable file botocore reads (signature,
checksum, send), handing out the chunks themselves or views of them, never copies; and
the S3 client's checksum choice per scheme. No server: ``tests/vm/test_s3.py`` uploads."""

from __future__ import annotations

import io
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boxvm import objstore
from boxvm.streams import StreamAborted, pread_views

_chunks = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@settings(max_examples=300, deadline=None)
@given(chunks=_chunks, sizes=st.lists(st.one_of(st.none(), st.integers(-1, 400)), min_size=1, max_size=30))
def test_reads_of_any_size_give_exactly_the_bytes_asked_for(chunks: list[bytes], sizes: list[int | None]) -> None:
    """A read gives exactly ``size`` bytes (what is left if fewer; all without a size) and,
    inside one chunk, the chunk itself or a view of it: nothing copied."""
    body, whole = objstore.PartBody(list(chunks), threading.Event()), b"".join(chunks)
    ends = [sum(len(c) for c in chunks[: i + 1]) for i in range(len(chunks))]
    got = bytearray()
    for i in range(60):
        size = sizes[i % len(sizes)]
        at = body.tell()
        piece = body.read(size)
        want = len(whole) - at if size is None or size < 0 else min(size, len(whole) - at)
        assert len(piece) == want and bytes(piece) == whole[at : at + want]
        first_end = next((e for e in ends if e > at), len(whole))
        if want > 0 and at + want <= first_end:  # inside one chunk
            assert any(piece is c for c in chunks) or (
                isinstance(piece, memoryview) and any(piece.obj is c for c in chunks)
            )
        got += piece
        assert body.tell() == len(got)
    got += body.read()
    assert got == whole
    assert body.read() == b"" and body.read(5) == b"" and body.tell() == len(whole)


def test_over_https_every_aws_chunk_but_the_last_is_whole() -> None:
    """Over HTTPS botocore sends each 1 MiB read of the body as one aws-chunk, and S3 refuses
    one under 8 KiB but the last: chunks of odd sizes (an uncompressed export's) still make
    1 MiB aws-chunks."""
    from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

    chunks = [os.urandom(n) for n in (512, 1 << 20, 3000, (1 << 20) - 7, 700, 5 << 20)]
    wire = AwsChunkedWrapper(objstore.PartBody(list(chunks), threading.Event()), checksum_cls=Crc32Checksum).read()
    sizes, data, at = [], bytearray(), 0
    while True:
        line_end = wire.index(b"\r\n", at)
        size = int(wire[at:line_end], 16)
        if size == 0:
            break
        sizes.append(size)
        data += wire[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2
    assert data == b"".join(chunks)
    assert all(s == 1 << 20 for s in sizes[:-1]) and 0 < sizes[-1] <= 1 << 20


def test_seek_and_tell_behave_as_botocore_needs() -> None:
    """botocore measures the length (seek to the end), hashes from the start, rewinds, and
    rewinds again for a retry."""
    chunks = [b"abc", b"defgh", b"ij"]
    body = objstore.PartBody(chunks, threading.Event())
    assert body.seekable()
    assert body.seek(0, io.SEEK_END) == 10 and body.tell() == 10
    assert body.seek(0) == 0
    assert body.read(3) is chunks[0]
    assert bytes(body.read(2)) == b"de" and bytes(body.read()) == b"fghij"
    assert body.seek(-5, io.SEEK_CUR) == 5 and bytes(body.read(10)) == b"fghij"
    assert body.seek(4) == 4 and bytes(body.read(1)) == b"e"
    for _ in range(2):  # a retry reads it all again
        body.seek(0)
        assert b"".join(bytes(p) for p in iter(lambda: body.read(1 << 20), b"")) == b"abcdefghij"
    empty = objstore.PartBody([], threading.Event())
    assert empty.read() == b"" and empty.seek(0, io.SEEK_END) == 0


def test_a_stopped_upload_s_body_fails_its_next_read() -> None:
    """Once the upload is stopped, the next read of a part's body fails while bytes remain:
    the request being sent breaks off mid-body, and a store keeps no part it did not get
    whole; the read that ends a whole body does not fail."""
    stopped = threading.Event()
    body = objstore.PartBody([b"abc", b"def"], stopped)
    assert body.read(2) == b"ab"
    stopped.set()
    with pytest.raises(StreamAborted):
        body.read(2)
    body.seek(0)
    stopped.clear()
    assert body.read(6) == b"abcdef"
    stopped.set()
    assert body.read(1) == b""  # a body sent whole is not cut: the store may keep it


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
