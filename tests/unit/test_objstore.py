"""``s3://`` URLs and the prefixes a server opens to REST callers (no server needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Generator

import pytest

from boxvm import objstore
from boxvm.errors import InvalidArgument


def test_urls_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Malformed URLs are refused before any request; REST callers get only the listed
    prefixes (none unless the operator sets BOXVM_REST_OBJECTS), never a ``..`` way out."""
    for bad in ("s3://", "s3://bucket", "s3://bucket/", "s3://Bad_Bucket/k", "s3://bucket/dir/", "s3://b/k", "/x"):
        with pytest.raises(InvalidArgument):
            objstore.parse(bad)
    url = objstore.parse("s3://bucket/rest/a/b")
    assert str(url) == "s3://bucket/rest/a/b"
    assert objstore.within(url, ["s3://bucket/rest/"])
    assert not objstore.within(url, ["s3://bucket/other/", "s3://other/"])
    assert not objstore.within(objstore.parse("s3://bucket/rest/../x"), ["s3://bucket/rest/"])
    monkeypatch.delenv(objstore.REST_PREFIXES, raising=False)
    with pytest.raises(InvalidArgument, match="not open to REST callers"):
        objstore.for_rest_caller("s3://bucket/rest/a")
    monkeypatch.setenv(objstore.REST_PREFIXES, "s3://bucket/rest/, s3://other/")
    assert objstore.for_rest_caller("s3://bucket/rest/a") == "s3://bucket/rest/a"
    assert objstore.for_rest_caller("s3://other/x") == "s3://other/x"
    with pytest.raises(InvalidArgument):
        objstore.for_rest_caller("s3://bucket/restless")
    assert not objstore.within(objstore.parse("s3://bucket/restless"), ["s3://bucket/rest"])
    assert objstore.within(objstore.parse("s3://bucket/rest/x"), ["s3://bucket/rest"])
    assert not objstore.within(objstore.parse("s3://bucket/rest/./x"), ["s3://bucket/rest/"])


def test_part_sizes_stay_bounded() -> None:
    """8 MiB parts, doubling every 1000 parts up to 64 MiB: S3's 10 000 parts hold > 400 GB
    while memory stays under a few parts."""
    sizes = [objstore._part_size(n) for n in range(1, 10_001)]
    assert sizes[0] == 8 << 20 and max(sizes) == 64 << 20
    assert all(s >= 5 << 20 for s in sizes) and sum(sizes) > 400 * 10**9


async def test_a_download_iterated_on_the_loop_and_cancelled_mid_read_ends_cancelled() -> None:
    """A remote backend uploads an object's bytes by iterating them on the loop; cancelled
    while a read runs in its thread, the download waits for that read before it closes
    the generator (closing it meanwhile raised "generator already executing")."""
    reading, closed = threading.Event(), threading.Event()

    class Slow(objstore.Download):
        def _fetch(self) -> Generator[bytes, None, None]:
            try:
                yield b"first"
                reading.set()
                time.sleep(0.3)
                yield b"second"
            finally:
                closed.set()

    async def drain() -> None:
        async for _ in Slow(objstore.parse("s3://bucket/key")).chunks():
            pass

    task = asyncio.ensure_future(drain())
    await asyncio.to_thread(reading.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


def test_failures_name_neither_the_endpoint_nor_a_config_file() -> None:
    """botocore's own text names the store's endpoint or a config file of this host; a REST
    caller gets the error's message, so it says what happened without them."""
    from botocore.exceptions import ConfigParseError, EndpointConnectionError, ReadTimeoutError

    url = objstore.parse("s3://bucket/key")
    for exc, said in (
        (EndpointConnectionError(endpoint_url="http://10.9.8.7:8333/bucket/key"), "cannot reach"),
        (ReadTimeoutError(endpoint_url="http://10.9.8.7:8333/bucket/key"), "did not answer in time"),
        (ConfigParseError(path="/root/.aws/config"), "ConfigParseError"),
    ):
        message = objstore._error(exc, url).message
        assert said in message and "s3://bucket/key" in message
        assert "10.9.8.7" not in message and "/root" not in message
