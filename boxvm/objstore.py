"""Archives in S3-compatible object storage: the ``s3://bucket/key`` form of export and import paths.

An export is a streamed multipart upload: parts are cut from the archive stream as it is
produced (no temporary file) and ``connections()`` of them upload at once while the next
fills (3 to a store on this host, 10 to any other), so memory stays under one more part than
that (8 MiB parts, growing only past 1000 parts, capped at 64 MiB). It is create-only: CompleteMultipartUpload
carries ``If-None-Match: *`` (AWS S3 and SeaweedFS honour it), so an object that appears
meanwhile is never replaced; ``refuse_existing`` (a HEAD) only refuses early, before an
archive is produced. A store that ignored the header would leave a HEAD-to-complete race.
Any failure or cancellation aborts the upload (``_stop_and_abort``: parts being sent are
cut, and a store that does not answer the others holds it ``_LINGER`` at most); a process
killed mid-way cannot, so each upload is journaled in the home (``tmp/s3uploads/<pid>-<n>``)
and the next S3 export from that home aborts the uploads of dead processes (a bucket
lifecycle rule with AbortIncompleteMultipartUpload is the backstop for a home that never
exports again). An
import streams the object into the verifying archive reader: one GET from a store on this
host, ``connections()`` ranged GETs handed over in order from any other (``Download``).

Client: boto3 (botocore). Measured here against SeaweedFS with 128 MiB of random bytes,
boto3 and obstore ran at the same speed (upload ~2.5-2.9 s, download ~0.3-0.4 s each: the
server is the bottleneck; obstore also aborted the interpreter at exit); one stream of 227 MB
read in 1 MiB pieces cost boto3 0.07 s of CPU and obstore 0.15 s (SeaweedFS 0.36 s either
way). Only boto3 hands out the upload id the crash journal needs, ``IfNoneMatch`` on
CompleteMultipartUpload, and the whole standard AWS configuration chain (env, ``~/.aws``
files and profiles, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from boxvm import faults
from boxvm.errors import AlreadyExists, BoxvmError, InvalidArgument, NotFound, StorageError, Unauthorized
from boxvm.streams import ReadAhead, Reader, Source, StreamAborted

log = logging.getLogger("boxvm")

SCHEME = "s3://"
_MIB = 1 << 20
_PART = 8 * _MIB  # S3's minimum is 5 MiB (except the last part)
_PART_MAX = 64 * _MIB
_INFLIGHT = 3  # parts uploading at once to a store on this host while the next one fills
_READ = _MIB  # bytes per read of a downloading object
_AHEAD = 16  # reads a download runs ahead of the import verifying it
_RANGE = 8 * _MIB  # bytes of one ranged GET
_CONNECTIONS = 10  # parts or ranged GETs at once with a store on another host, as boto3's transfers run
_MAX_CONNECTIONS = 32
CONNECTIONS_ENV = "BOXVM_S3_CONNECTIONS"
_STALL_S = 300.0  # seconds one read of a download (``_READ`` bytes) may take: ~3.5 KB/s a connection
_WATCH_S = 1.0  # how often the reads' deadlines are checked
_REPLY_MAX = 4 * _MIB  # bytes of a reply that is not an object's body (a listing of 1000 keys: ~1.3 MB)
_REPLY_S = 120.0  # seconds such a reply's body may take in all
_COMPLETE_S = 900.0  # ... and a completion's, which AWS pads with spaces while it works
_RECOVERY_S = 30.0  # seconds an export spends at most aborting the uploads of dead processes
_ABORT_S = 15.0  # seconds one abort of theirs takes at most (the quick client: 5 s to connect, 10 to read)
_RECOVERY_DAYS = 7  # days an upload whose abort keeps failing stays in the journal
_LINGER = 10.0  # seconds a cancelled export waits for the store to answer parts it has whole
_JOURNAL = "s3uploads"  # a sub-directory of the home's tmp/ (its name keeps start-up recovery off it)
_MARK = "boxvm-upload"  # user metadata: the export that made the object (a random value)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class ObjectURL:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def is_url(path: object) -> bool:
    """Whether an archive path names an object (``s3://…``) rather than a host file."""
    return isinstance(path, str) and path.startswith(SCHEME)


def parse(url: str) -> ObjectURL:
    """``s3://bucket/key`` → its parts, validated (a bucket name as S3 allows, a non-empty key)."""
    if not is_url(url):
        raise InvalidArgument(f"{url!r} is not an s3://bucket/key URL")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidArgument(f"{url!r}: {bucket!r} is not a valid bucket name")
    if not key or key.endswith("/") or len(key.encode()) > 1024 or any(ord(c) < 32 for c in key):
        raise InvalidArgument(f"{url!r}: give an object key (not empty, not ending in '/', at most 1024 bytes)")
    return ObjectURL(bucket, key)


def within(url: ObjectURL, prefixes: list[str]) -> bool:
    """Whether ``url`` lies under one of ``prefixes`` (``s3://bucket/`` or ``s3://bucket/dir/``)."""
    segments = url.key.split("/")
    if ".." in segments or "." in segments:  # some stores (SeaweedFS's filer) resolve them
        return False
    for prefix in prefixes:
        bucket, _, key_prefix = prefix.removeprefix(SCHEME).partition("/")
        if key_prefix and not key_prefix.endswith("/"):
            key_prefix += "/"  # a folder, never a name's beginning ("rest" must not open "restless")
        if url.bucket == bucket and url.key.startswith(key_prefix):
            return True
    return False


def _env_key() -> tuple[str | None, ...]:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")
    return tuple(os.environ.get(n) for n in names)


def client(endpoint_url: str | None = None) -> Any:
    """An S3 client configured the standard AWS way (env, ``~/.aws`` files, ``AWS_ENDPOINT_URL``)."""
    return _client(_env_key(), endpoint_url)


@lru_cache(maxsize=8)
def _client(_env: tuple[str | None, ...], endpoint_url: str | None, quick: bool = False) -> Any:
    """``quick``: one attempt with short timeouts (the journal's recovery, before an export)."""
    import boto3  # lazily: most boxvm processes never talk to object storage
    from botocore.config import Config

    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": 0 if quick else 5},  # retries, after the first attempt
        "connect_timeout": 5 if quick else 10,  # (_ABORT_S)
        "read_timeout": 10 if quick else 120,
        "max_pool_connections": _MAX_CONNECTIONS + 2,
    }
    session = boto3.session.Session()
    s3 = session.client("s3", endpoint_url=endpoint_url, config=Config(**options))
    if s3.meta.endpoint_url.startswith("http://"):
        # Over plain HTTP botocore signs each body's SHA-256 (AWS S3 and MinIO check it; so
        # does every import, end to end, against the manifest's SHA-256s); the CRC32 it adds
        # by default (since 1.36) covers the same bytes again, for ~0.1 CPU s per 227 MB here.
        # Over HTTPS the body is unsigned and that CRC32 is its check, so it stays.
        s3 = session.client(
            "s3", endpoint_url=endpoint_url, config=Config(**options, request_checksum_calculation="when_required")
        )
    s3.meta.events.register("before-send.s3", _refuse_when_stopped)
    s3.meta.events.register("before-send.s3", partial(_bounded_reply, s3._endpoint.http_session))
    s3.meta.events.register_first("needs-retry.s3", _no_retry_when_stopped)  # before the retry handler
    s3.meta.events.register_first("needs-retry.s3", _no_redirect)  # before botocore's region redirector
    return s3


# -- stopping a transfer's requests ---------------------------------------------------
_stopping = threading.local()


@contextlib.contextmanager
def _stoppable(stopped: threading.Event) -> Iterator[None]:
    """Requests this thread makes inside fail with StreamAborted once ``stopped`` is set,
    including one under way: botocore makes up to 6 attempts of a failed request, each up to
    its 120 s read timeout, long after a cancelled transfer gave it up."""
    _stopping.event = stopped
    try:
        yield
    finally:
        _stopping.event = None


def _refuse_when_stopped(**_: object) -> None:
    """botocore's ``before-send`` hook, run before every attempt of a request (``_stoppable``).
    StreamAborted is no error botocore retries: the call raises it."""
    stopped = getattr(_stopping, "event", None)
    if stopped is not None and stopped.is_set():
        raise StreamAborted("the transfer was stopped")


def _no_retry_when_stopped(response: Any = None, caught_exception: Any = None, **_: object) -> None:
    """botocore's ``needs-retry`` hook, run ahead of its retry handler after every attempt: a
    failed attempt of a stopped transfer raises StreamAborted instead of sleeping a backoff
    and spending the client's retry quota (a part cut mid-body counts as a transient error).
    A successful one is left alone: its reply may hold a connection to release."""
    if caught_exception is not None or (response is not None and response[0].status_code >= 400):
        _refuse_when_stopped()


def _bounded_reply(http: Any, request: Any = None, event_name: str = "", **_: object) -> Any:
    """botocore's ``before-send`` hook, run after ``_refuse_when_stopped``: it sends the
    request itself so that a reply other than an object's body (an error's too) is read
    within ``_REPLY_MAX`` bytes and ``_REPLY_S`` seconds. botocore reads such a reply whole,
    with no bound on its size and a timeout only per socket read: a hostile store's 200 MB
    answer to an upload's start grew this process by 620 MiB, and one trickled held the call
    for ever. It has no option for either, so the hook reads the body and hands botocore the
    reply it would have made (an ``AWSResponse`` over what was read). An object's body is
    left to ``Download._read``, which bounds each of its reads."""
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError
    from urllib3.exceptions import HTTPError
    from urllib3.exceptions import ReadTimeoutError as ReadTimedOut

    if request is None:
        return None
    body_wanted = request.stream_output
    request.stream_output = True  # so that the session leaves the body to this hook
    try:
        reply = http.send(request)
    finally:
        request.stream_output = body_wanted
    if body_wanted and reply.status_code < 300:
        return reply
    # AWS answers a completion at once and then sends spaces while it works, "for several minutes"
    seconds = _COMPLETE_S if event_name.endswith(".CompleteMultipartUpload") else _REPLY_S
    raw, slow = reply.raw, threading.Event()

    def end() -> None:
        slow.set()  # before the shutdown: what the body gives from then on is not used
        raw.shutdown()

    try:
        with _deadline(end, seconds):
            body = _whole(raw, slow)
    except BaseException as exc:
        raw.close()  # not back to the pool: the rest of that reply is unread
        if isinstance(exc, ReadTimedOut) and not slow.is_set():  # botocore's errors for these, both retried
            raise ReadTimeoutError(endpoint_url=request.url) from None
        if isinstance(exc, HTTPError) and not slow.is_set():  # (dropped mid-body)
            raise ConnectionClosedError(endpoint_url=request.url) from None
        if not slow.is_set():
            raise
    if slow.is_set():  # (also a read that returned as its deadline passed: its socket is shut)
        raw.close()
        raise StorageError(f"object storage sent a reply too slowly (not within {seconds:g} s): try again")
    return AWSResponse(reply.url, reply.status_code, reply.headers, _Read(body))


def _whole(raw: Any, slow: threading.Event) -> bytes:
    """A reply's body, at most ``_REPLY_MAX`` bytes of it, until ``slow`` is set."""
    parts, size = [], 0
    while not slow.is_set() and (data := raw.read(64 << 10)):
        size += len(data)
        if size > _REPLY_MAX:
            raise StorageError(
                f"object storage sent a reply of over {_REPLY_MAX >> 20} MiB where S3 sends a few KB: "
                "is AWS_ENDPOINT_URL an S3 store?"
            )
        parts.append(data)
    return b"".join(parts)


class _Read:
    """A reply body already read, as ``AWSResponse`` reads its ``raw`` (``stream``)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, *_: object, **__: object) -> Iterator[bytes]:
        yield self._data


def _no_redirect(response: Any = None, request_dict: Any = None, **_: object) -> None:
    """botocore's ``needs-retry`` hook: a redirect from a store that is not AWS S3 (whose
    region redirects botocore follows) fails the request. botocore's redirector took a
    hostile store's 301 for a region hint and asked it again ~80 times before failing."""
    if response is None or not 300 <= response[0].status_code < 400:
        return
    host = urllib.parse.urlsplit(str((request_dict or {}).get("url", ""))).hostname or ""
    if not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        raise StorageError("object storage answered with a redirect: set AWS_ENDPOINT_URL to the store's own address")


def _error(exc: Exception, url: ObjectURL) -> BoxvmError:
    """A botocore failure as a boxvm error naming the object and what to do. Never botocore's
    own text, which a REST caller would see: it names the store's endpoint or a config file
    of this host (that detail goes to this host's log)."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, BoxvmError):
        return exc
    if isinstance(exc, NoCredentialsError):
        return Unauthorized(f"no credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws")
    if isinstance(exc, ClientError):
        code, status = _code(exc) or "", _status(exc)
        if code == "NoSuchBucket":
            return NotFound(f"bucket {url.bucket!r} does not exist: create it first")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"no object at {url}")
        if code in ("PreconditionFailed", "412") or status == 412:
            return AlreadyExists(f"{url} already exists: objects are never overwritten, choose another key")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            return Unauthorized(f"object storage refused access to {url} ({code!r:.40}): check the AWS credentials")
        return StorageError(f"object storage failed on {url}: {code or status!r:.80}")
    log.warning("object storage failed on %s: %s", url, exc)
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(f"cannot reach the object storage of {url}: check its endpoint and the network")
    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"object storage did not answer in time on {url}: try again")
    if isinstance(exc, OSError):  # its text may name a path of this host
        return StorageError(f"object storage failed on {url}: {exc.strerror or type(exc).__name__}")
    if not type(exc).__module__.startswith(("botocore", "urllib3", "boto3")):  # ours (the archive stream's)
        return StorageError(f"object storage failed on {url}: {exc!s:.200}")
    return StorageError(f"object storage failed on {url} ({type(exc).__name__}; the log where it ran has more)")


# -- export -------------------------------------------------------------------------
def _part_size(number: int) -> int:
    """Size of part ``number`` (1-based): 8 MiB, doubling every 1000 parts up to 64 MiB, so
    S3's 10 000 parts hold ~500 GB while a usual archive uses small parts."""
    return min(_PART << ((number - 1) // 1000), _PART_MAX)


async def upload(chunks: AsyncIterator[bytes], url: ObjectURL, journal_dir: Path | None) -> None:
    """Upload the byte stream ``chunks`` as a new object at ``url``; see the module doc."""
    if journal_dir is not None:
        await asyncio.to_thread(recover, journal_dir)
    s3 = client()
    inflight = connections(s3, _INFLIGHT)
    mark = secrets.token_hex(16)  # this upload's, on the object it makes (``_complete``)
    try:
        created = await asyncio.to_thread(
            s3.create_multipart_upload, Bucket=url.bucket, Key=url.key, Metadata={_MARK: mark}
        )
        upload_id = created.get("UploadId")
        if not isinstance(upload_id, str) or not 0 < len(upload_id) <= 1024:
            raise StorageError(f"object storage gave no valid upload id for {url}")
    except Exception as exc:
        raise _error(exc, url) from exc
    sender = _Sender(s3, url, upload_id)
    journal: Path | None = None
    try:
        journal = _journal(journal_dir, s3, url, sender.upload_id)
        parts = await _parts(sender, chunks, inflight)
        await _complete(s3, url, sender.upload_id, parts, mark)
    except BaseException as exc:
        await asyncio.shield(asyncio.to_thread(_stop_and_abort, sender, journal))
        if isinstance(exc, Exception):
            raise _error(exc, url) from exc
        raise
    if journal is not None:
        journal.unlink(missing_ok=True)


def _stop_and_abort(sender: _Sender, journal: Path | None) -> None:
    """Abort the upload once its parts in flight end (a part stored after the abort would
    stay), waiting ``_LINGER`` at most: a store that went silent would hold the cancel for
    its read timeout. Parts still unanswered then abort it again as the last of them ends,
    and the journal stays until an abort after them succeeds (or the next export from this
    home makes one)."""
    s3, url, upload_id = sender.s3, sender.url, sender.upload_id

    def abort() -> None:
        if _abort(s3, url, upload_id) and journal is not None:
            journal.unlink(missing_ok=True)

    if sender.stop(_LINGER):
        abort()
    else:
        _abort(s3, url, upload_id)
        sender.when_idle(abort)


async def _complete(s3: Any, url: ObjectURL, upload_id: str, parts: list[dict[str, object]], mark: str) -> None:
    """CompleteMultipartUpload, create-only. Cancelled while the store completes it, the
    object it may still make is deleted (by whichever of the call's thread and the
    cancelled caller learns last of the other): a cancelled export leaves no object. A
    refusal after an attempt whose answer was lost (botocore retried it: the object exists,
    the upload is gone) is this upload's success if the object carries its ``mark``."""
    lock, state = threading.Lock(), {"cancelled": False, "made": False}

    def complete() -> None:
        try:
            s3.complete_multipart_upload(
                Bucket=url.bucket, Key=url.key, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
        except Exception as exc:
            code, status = _code(exc), _status(exc)
            if not (code in ("PreconditionFailed", "NoSuchUpload") or status == 412) or not _made_by(s3, url, mark):
                raise
        with lock:
            state["made"] = True
            undo = state["cancelled"]
        if undo:
            _delete_made(s3, url)

    try:
        await asyncio.shield(asyncio.to_thread(complete))
    except asyncio.CancelledError:
        with lock:
            state["cancelled"] = True
            undo = state["made"]
        if undo:
            await asyncio.shield(asyncio.to_thread(_delete_made, s3, url))
        raise


def _made_by(s3: Any, url: ObjectURL, mark: str) -> bool:
    """Whether the object at ``url`` is the one the upload marked ``mark`` made."""
    try:
        head = s3.head_object(Bucket=url.bucket, Key=url.key)
    except Exception:
        return False
    return isinstance(head.get("Metadata"), dict) and head["Metadata"].get(_MARK) == mark


def _delete_made(s3: Any, url: ObjectURL) -> None:
    try:
        s3.delete_object(Bucket=url.bucket, Key=url.key)
    except Exception as exc:
        log.warning("a cancelled export of %s completed meanwhile and could not be deleted (%s)", url, exc)


async def refuse_existing(url: ObjectURL) -> None:
    """AlreadyExists if the object exists: an early refusal, before an archive is produced
    (``upload``'s conditional completion is what guarantees create-only)."""
    try:
        await _head(url)
    except NotFound as err:
        if "no object" in err.message:
            return
        raise
    raise AlreadyExists(f"{url} already exists: objects are never overwritten, choose another key")


async def _parts(sender: _Sender, chunks: AsyncIterator[bytes], inflight: int) -> list[dict[str, object]]:
    """Cut ``chunks`` into parts and upload them, ``inflight`` at a time; once parts grow
    past 8 MiB (archives over ~8 GB), fewer: no more bytes than ``inflight`` parts of 8 MiB."""
    done: dict[int, str] = {}
    running: set[asyncio.Task[None]] = set()

    async def send(number: int, body: list[bytes | memoryview]) -> None:
        done[number] = await sender.send(number, body)
        faults.point("s3:part-uploaded")

    async def start(number: int, body: list[bytes | memoryview]) -> None:
        while len(running) >= max(1, inflight * _PART // _part_size(number)):
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            running.difference_update(finished)
            for task in finished:
                task.result()  # a failed part fails the upload now
        running.add(asyncio.create_task(send(number, body)))

    number, pending, held = 1, list[bytes | memoryview](), 0  # chunks not yet in a part, and their bytes
    try:
        async for chunk in chunks:
            pending.append(chunk)
            held += len(chunk)
            while held >= _part_size(number):
                size = _part_size(number)
                if held > size:  # a chunk straddles the part's end (the compressor's 1 MiB chunks never do)
                    last = memoryview(pending.pop())  # views: a chunk spanning many parts is not copied for each
                    cut = len(last) - (held - size)
                    pending.append(last[:cut])
                    rest: list[bytes | memoryview] = [last[cut:]]
                else:
                    rest = []
                await start(number, pending)
                pending, held = rest, held - size
                number += 1
        if held or number == 1:  # the last part (S3 wants at least one, even empty)
            await start(number, pending)
        if running:
            await asyncio.gather(*running)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return [{"PartNumber": n, "ETag": done[n]} for n in sorted(done)]


class _Sender:
    """One multipart upload's part requests, each on a daemon thread of its own (``_parts``
    runs at most ``connections()`` at once). Not the loop's default executor: seconds per
    part on a slow link, they would hold it from the archive's writer and every other call.
    Not a ``ThreadPoolExecutor`` either: the interpreter joins its threads at exit, and a
    part a silent store never answers would hold a stopped process there."""

    def __init__(self, s3: Any, url: ObjectURL, upload_id: str) -> None:
        self.s3, self.url, self.upload_id = s3, url, upload_id
        self.stopped = threading.Event()
        self._idle = threading.Condition()
        self._running = 0
        self._then: Callable[[], None] | None = None  # run by the last part to end after a stop

    async def send(self, number: int, chunks: list[bytes | memoryview]) -> str:
        """Upload part ``number``; its ETag."""
        body, result = PartBody(chunks, self.stopped), Future[str]()

        def run() -> None:
            if not result.set_running_or_notify_cancel():  # the upload failed before this part began
                self._ended()
                return
            try:
                with _stoppable(self.stopped):
                    reply = self.s3.upload_part(
                        Bucket=self.url.bucket, Key=self.url.key, UploadId=self.upload_id, PartNumber=number, Body=body
                    )
                result.set_result(reply["ETag"])
            except BaseException as exc:
                result.set_exception(exc)
            finally:
                self._ended()

        with self._idle:
            self._running += 1
        try:
            threading.Thread(target=run, name="boxvm-s3-part", daemon=True).start()
        except BaseException:
            self._ended()
            raise
        return await asyncio.wrap_future(result)

    def _ended(self) -> None:
        then = None
        with self._idle:
            self._running -= 1
            if not self._running:
                then, self._then = self._then, None
            self._idle.notify_all()
        if then is not None:
            then()

    def stop(self, linger: float) -> bool:
        """No part makes another attempt, and one still being sent is cut (a store keeps
        no part it did not get whole); True once none is in flight, False if some still are
        after ``linger`` seconds (sent whole, their answers not come)."""
        self.stopped.set()
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, linger)

    def when_idle(self, then: Callable[[], None]) -> None:
        """Run ``then`` once no part is in flight: now, or on the thread of the last to end."""
        with self._idle:
            if self._running:
                self._then = then
                return
        then()


class PartBody:
    """A part's bytes as the seekable file botocore reads (over HTTP: for the SHA-256 it
    signs, then to send them in 128 KiB blocks; over HTTPS: once, 1 MiB per aws-chunk with
    the CRC32), over the archive's chunks as they are. Given ``bytes``, botocore wraps them
    in a ``BytesIO`` whose every read copies, and joining the chunks copied each part once
    more (~8 % of an export's CPU here, perf). A read inside one chunk returns the chunk
    itself or a view of it; only a read across chunks joins."""

    def __init__(self, chunks: list[bytes | memoryview], stopped: threading.Event) -> None:
        self._chunks, self._stopped = chunks, stopped
        self._starts = list(itertools.accumulate((len(c) for c in chunks), initial=0))
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes | memoryview:
        """Exactly ``size`` bytes (what is left if fewer; all of it without a size): over
        HTTPS each read is sent as one aws-chunk, and S3 refuses one under 8 KiB but the last.
        StreamAborted once the upload is stopped, while bytes remain: the request fails
        mid-body, and a store keeps no part it did not get whole (a body sent whole waits
        for its answer, as the store may keep it)."""
        total = self._starts[-1]
        if self._stopped.is_set() and self._pos < total:
            raise StreamAborted("the upload was stopped")
        end = total if size is None or size < 0 else min(total, self._pos + size)
        pieces: list[bytes | memoryview] = []
        while self._pos < end:
            index = bisect.bisect_right(self._starts, self._pos) - 1
            chunk, at = self._chunks[index], self._pos - self._starts[index]
            stop = min(len(chunk), at + end - self._pos)
            pieces.append(chunk if at == 0 and stop == len(chunk) else memoryview(chunk)[at:stop])
            self._pos += stop - at
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _abort(s3: Any, url: ObjectURL, upload_id: str) -> bool:
    """Abort an upload (its parts are freed); False if the store could not be told."""
    try:
        s3.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload_id)
    except Exception as exc:
        if _code(exc) == "NoSuchUpload":
            return True
        log.warning("could not abort the upload of %s (%s): the next export from this home retries", url, exc)
        return False
    return True


# -- the crash journal ----------------------------------------------------------------
_seq = iter(range(1 << 62))
_seq_lock = threading.Lock()


def _journal(journal_dir: Path | None, s3: Any, url: ObjectURL, upload_id: str) -> Path | None:
    if journal_dir is None:
        return None
    folder = journal_dir / _JOURNAL
    with _seq_lock:
        entry = folder / f"{os.getpid()}-{next(_seq)}"
    record = {"endpoint": s3.meta.endpoint_url, "bucket": url.bucket, "key": url.key, "upload_id": upload_id}
    tmp = entry.with_name(entry.name + ".new")
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, entry)
    except OSError as exc:
        raise StorageError(f"cannot journal the upload of {url} in this home's tmp/: {exc.strerror}") from None
    return entry


def recover(journal_dir: Path, alive: Callable[[int], bool] | None = None) -> None:
    """Abort the multipart uploads that dead processes of this home left (their parts would
    otherwise stay billed and listed, though they never become an object). Bounded, as it
    runs before every export: each abort is one attempt with short timeouts (``_ABORT_S``),
    the whole ``_RECOVERY_S`` at most (the rest waits for the next export), and an entry that could
    not be aborted for ``_RECOVERY_DAYS`` is given up (a bucket lifecycle rule is the backstop)."""
    from boxvm.processes import alive as pid_alive

    alive = alive or pid_alive
    deadline = time.monotonic() + _RECOVERY_S
    try:
        entries = list((journal_dir / _JOURNAL).iterdir())
    except OSError:  # none yet (or unreadable: the next export's journal says so)
        return
    for entry in entries:
        pid = entry.name.split("-")[0]
        if time.monotonic() + _ABORT_S > deadline:  # no time left for one more abort
            return
        if not pid.isdigit() or alive(int(pid)):
            continue
        try:
            if entry.name.endswith(".new"):
                entry.unlink(missing_ok=True)
                continue
            try:
                record = json.loads(entry.read_text())
                url, upload_id = ObjectURL(record["bucket"], record["key"]), record["upload_id"]
                s3 = _client(_env_key(), record["endpoint"], True)
            except (ValueError, KeyError, TypeError):
                entry.unlink(missing_ok=True)
                continue
            if _abort(s3, url, str(upload_id)):
                log.info("aborted the upload of %s left by dead process %s", url, pid)
                entry.unlink(missing_ok=True)
            elif time.time() - entry.stat().st_mtime > _RECOVERY_DAYS * 86400:
                log.warning("giving up the abort of the upload of %s left by dead process %s", url, pid)
                entry.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot read the upload journal %s: %s", entry.name, exc.strerror)


# -- import -------------------------------------------------------------------------
async def _head(url: ObjectURL) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(client().head_object, Bucket=url.bucket, Key=url.key)  # type: ignore[no-any-return]
    except Exception as exc:
        raise _error(exc, url) from exc


async def size(url: ObjectURL) -> int:
    """The object's size; NotFound if it does not exist."""
    length = (await _head(url)).get("ContentLength")
    if not isinstance(length, int) or not 0 <= length < 1 << 50:
        raise StorageError(f"object storage gave no valid size for {url}")
    return length


async def identity(url: ObjectURL) -> str:
    """What tells this object from another one put at the same key later (its ETag, version
    id, size and time, for stores that give no ETag); NotFound if it does not exist."""
    head = await _head(url)
    return "/".join(str(head.get(k, "")) for k in ("ETag", "VersionId", "ContentLength", "LastModified"))


def download(url: ObjectURL) -> Download:
    """The object's bytes, streamed (see ``Download``)."""
    return Download(url)


class Download(Source):
    """An object's bytes, read once. An import in this process reads them from a download
    thread that stays up to ``_AHEAD`` reads of ``_READ`` bytes ahead of the verifier
    (``open``), so the import takes about as long as the slower of the two, not their sum;
    iterated on the event loop (a remote backend uploading them), one ``_READ`` at a time.

    From a store on another host the object comes as ``_RANGE`` pieces, ``connections()`` of
    them fetched at once and handed over in order (``_Ranges``), as boto3's own downloads do:
    AWS S3 serves one connection at ~50-100 MB/s, and a single GET made an import 7x slower
    than ``download_file`` through a link capped at 40 MB/s a connection. From a store on
    this host, one GET for the whole object: the server shares this host's CPU, and ranged
    GETs cost both ends more of it (on loopback, 2 of them in flight made an import ~15 %
    slower; timing the first MiBs of the GET to choose was wrong 3 times in 8 on this busy
    host, where a loopback connection measured 34-1500 MB/s). Memory: the read-ahead, plus
    the pieces in flight (96 MiB with 10 connections). An abort (a cancelled import) shuts
    the sockets being read, so it does not wait for a slow or stalled store."""

    def __init__(self, url: ObjectURL) -> None:
        self.url = url
        _configured()  # a bad setting fails the import before it starts
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._bodies: set[Any] = set()  # responses being read: an abort shuts their sockets
        self._ranges: _Ranges | None = None
        self._slow: set[Any] = set()  # the bodies a read of which took longer than ``_STALL_S``

    async def chunks(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        fetch = self._fetch()
        read: asyncio.Future[bytes] | None = None
        try:
            while True:
                read = asyncio.ensure_future(asyncio.to_thread(next, fetch, b""))
                if not (chunk := await asyncio.shield(read)):
                    break
                yield chunk
        finally:
            if read is not None and not read.done():  # cancelled mid-read: its thread still runs the generator
                self._abort()
                await asyncio.wait({read})  # not cancelled by a second cancel, unlike a gather
            await asyncio.to_thread(fetch.close)

    def open(self) -> Reader:
        return ReadAhead(self._fetch, _AHEAD, name="boxvm-s3-download", interrupt=self._abort)

    def _abort(self) -> None:
        """(Any thread.) Stop now: reads in progress fail at once, no new request starts."""
        self._stopped.set()
        with self._lock:
            bodies, ranges = list(self._bodies), self._ranges
        for body in bodies:
            # botocore's StreamingBody has no way to interrupt a read; urllib3's response
            # (>= 2.3) shuts its socket down, which ends a read blocked in another thread
            with contextlib.suppress(Exception):
                body._raw_stream.shutdown()
        if ranges is not None:
            ranges.wake()

    def _fetch(self) -> Generator[bytes, None, None]:
        s3 = client()
        count = connections(s3, 1)
        reply = self._get(s3, f"bytes=0-{_RANGE - 1}" if count > 1 else None)
        if reply is None:
            return  # an empty object: it has no byte 0 to ask for
        pin = _pin(reply)
        if reply["ResponseMetadata"]["HTTPStatusCode"] != 206:  # one GET, or a store that ignores ranges
            yield from self._body(reply)
            return
        if pin is None:  # nothing would hold the pieces to one version (a rare store): one GET
            self._release(reply)
            if (reply := self._get(s3, None)) is not None:
                yield from self._body(reply)
            return
        with _Ranges(self, s3, reply, pin, count) as pieces:
            yield from pieces

    def _get(self, s3: Any, span: str | None, pin: dict[str, str] | None = None) -> dict[str, Any] | None:
        """GET the object, or the bytes ``span`` of it (of the version ``pin`` names); None
        if ``span`` starts past its end. Its body is shut down by an abort until released."""
        if self._stopped.is_set():
            raise StreamAborted("the download was stopped")
        extra = {"Range": span} if span else {}
        try:
            with _stoppable(self._stopped):
                reply = s3.get_object(Bucket=self.url.bucket, Key=self.url.key, **extra, **(pin or {}))
        except Exception as exc:
            if self._stopped.is_set():
                raise StreamAborted("the download was stopped") from exc
            if _status(exc) == 416 and span:
                return None
            if _status(exc) == 412:
                raise StorageError(f"{self.url} changed while it was imported: import it again") from exc
            raise _error(exc, self.url) from exc
        with self._lock:
            self._bodies.add(reply["Body"])
        if self._stopped.is_set():
            self._abort()  # stopped while the request ran
        return reply  # type: ignore[no-any-return]

    def _release(self, reply: dict[str, Any]) -> None:
        with self._lock:
            self._bodies.discard(reply["Body"])
        with contextlib.suppress(Exception):
            reply["Body"].close()

    def _body(self, reply: dict[str, Any]) -> Iterator[bytes]:
        try:
            yield from iter(partial(self._read, reply["Body"]), b"")
        finally:
            self._release(reply)

    def _read(self, body: Any, most: int = _READ) -> bytes:
        """Up to ``most`` bytes of ``body``, within ``_STALL_S`` (botocore's read timeout is
        per socket read: a store sending a byte a minute would hold the import forever)."""

        def end() -> None:
            with self._lock:
                self._slow.add(body)  # before the shutdown: what the body gives from then on is not used
            body._raw_stream.shutdown()

        def slow() -> bool:
            with self._lock:
                return body in self._slow

        with _deadline(end, _STALL_S):
            try:
                if not slow():
                    data: bytes = body.read(min(most, _READ))
            except Exception as exc:
                if self._stopped.is_set():
                    raise StreamAborted("the download was stopped") from exc
                if not slow():
                    raise _error(exc, self.url) from exc
        if slow():  # (also one that returned as its deadline passed: its socket is shut, maybe mid-record)
            raise StorageError(
                f"object storage sent {self.url} too slowly (under {_READ >> 20} MiB in {_STALL_S:g} s): try again"
            )
        return data


# Reads that must end in time (``_deadline``): their due time and what ends them, checked by
# one daemon thread (a timer thread per read cost ~0.1 ms each, 230 of them an import).
_due: dict[int, tuple[float, Callable[[], None]]] = {}
_due_lock = threading.Lock()
_due_ids = itertools.count()
_watching: list[threading.Thread] = []


@contextlib.contextmanager
def _deadline(end: Callable[[], None], seconds: float) -> Iterator[None]:
    """Run ``end`` (which fails the read the block makes, from another thread) if the block
    is still running ``seconds`` on (give or take ``_WATCH_S``)."""
    token = next(_due_ids)
    try:
        with _due_lock:
            _due[token] = (time.monotonic() + seconds, end)
            if not _watching:
                watcher = threading.Thread(target=_watch, name="boxvm-s3-deadlines", daemon=True)
                watcher.start()
                _watching.append(watcher)
        yield
    finally:
        with _due_lock:
            _due.pop(token, None)


def _watch() -> None:
    while True:
        time.sleep(_WATCH_S)
        now = time.monotonic()
        with _due_lock:
            late = [token for token, (due, _) in _due.items() if due <= now]
            ends = [_due.pop(token)[1] for token in late]
        for end in ends:
            with contextlib.suppress(Exception):
                end()


def _pin(reply: dict[str, Any]) -> dict[str, str] | None:
    """What holds later GETs to the version ``reply`` came from: its version id (a versioned
    bucket; "null" names whatever version is unversioned now, so it holds nothing) and its
    ETag if strong (``If-Match`` never matches a weak one); None if neither."""
    pin = {}
    if (version := reply.get("VersionId")) and version != "null":
        pin["VersionId"] = str(version)
    if isinstance(etag := reply.get("ETag"), str) and etag and not etag.startswith("W/"):
        pin["IfMatch"] = etag
    return pin or None


def connections(s3: Any, local: int) -> int:
    """How many requests an export (parts) or an import (ranged GETs) runs at once:
    ``$BOXVM_S3_CONNECTIONS`` (1-32) if set, else ``_CONNECTIONS`` with a store on another
    host and ``local`` with one on this host (its endpoint a loopback address or a
    ``localhost`` name), which shares this host's CPU: more requests cost both ends more of it."""
    if (value := _configured()) is not None:
        return value
    host = (urllib.parse.urlsplit(s3.meta.endpoint_url).hostname or "").lower()
    try:
        address = ipaddress.ip_address(host)
        here = address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)
    except ValueError:  # a name
        here = host == "localhost" or host.endswith(".localhost")
    return local if here else _CONNECTIONS


def _configured() -> int | None:
    """``$BOXVM_S3_CONNECTIONS``, checked; None if unset."""
    if (value := os.environ.get(CONNECTIONS_ENV)) is None:
        return None
    if not (value.isascii() and value.isdecimal() and 1 <= int(value) <= _MAX_CONNECTIONS):
        raise InvalidArgument(f"{CONNECTIONS_ENV} must be a number from 1 to {_MAX_CONNECTIONS}, not {value!r:.32}")
    return int(value)


_PINNED = (("ETag", "IfMatch"), ("VersionId", "VersionId"))  # what a piece's reply must repeat of the pin
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")


class _Ranges:
    """An object as ``_RANGE`` pieces, ``count`` of them being fetched at once (the next
    starts when the reader has taken the oldest), each handed to the reader in order as its
    bytes arrive. Every piece after the first is asked for from the first one's version
    (``pin``): an object replaced meanwhile fails the import instead of mixing two archives.
    Memory: at most ``count`` pieces. Leaving early stops every GET (``Download._abort``)
    without waiting for them."""

    def __init__(self, download: Download, s3: Any, first: dict[str, Any], pin: dict[str, str], count: int) -> None:
        self._download, self._s3, self._pin = download, s3, pin
        try:
            self._size = self.check(download, first)
        except BaseException:
            download._release(first)
            raise
        self._offsets = iter(range(_RANGE, self._size, _RANGE))
        self._lock = threading.Lock()  # the pieces change on the reader's thread; an abort reads them on another
        self._pieces: deque[_Piece] = deque([_Piece()])
        with download._lock:
            download._ranges = self
        try:
            self._run(self._pieces[0], 0, first)
            for _ in range(count - 1):
                self._start_next()
        except BaseException:  # no thread for one ("can't start new thread"): stop those started
            self.__exit__(None, None, None)
            download._release(first)  # if its own thread never started (else a second release does nothing)
            raise

    def _run(self, piece: _Piece, at: int, reply: dict[str, Any] | None) -> None:
        # a daemon thread per piece (at most ``count`` at a time): a GET still waiting for a
        # store that never answers must not hold the interpreter's exit, as a pool's would
        threading.Thread(target=self._fetch, args=(piece, at, reply), name="boxvm-s3-range", daemon=True).start()

    @staticmethod
    def check(download: Download, first: dict[str, Any]) -> int:
        """The object's size, from the first piece's Content-Range (which must be bytes 0 to
        ``_RANGE - 1``, or to the end of a smaller object)."""
        found = _CONTENT_RANGE.fullmatch(str(first.get("ContentRange")))
        size = int(found[3]) if found else 0
        if not found or int(found[1]) != 0 or int(found[2]) != min(_RANGE, size) - 1:
            raise StorageError(f"object storage sent another range of {download.url} than the one asked for")
        return size

    def _start_next(self) -> None:
        if (at := next(self._offsets, None)) is not None:
            piece = _Piece()
            with self._lock:
                self._pieces.append(piece)
            self._run(piece, at, None)

    def wake(self) -> None:
        """(Any thread.) End every piece: the reader waiting for one raises StreamAborted."""
        with self._lock:
            pieces = list(self._pieces)
        for piece in pieces:
            piece.end(StreamAborted("the download was stopped"))

    def __enter__(self) -> _Ranges:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pieces:
            self._download._abort()  # left early (a failure, or the reader stopped): the GETs end at once
        with self._download._lock:
            self._download._ranges = None

    def __iter__(self) -> Iterator[bytes]:
        while self._pieces:
            yield from self._pieces[0]
            with self._lock:
                self._pieces.popleft()
            self._start_next()

    def _fetch(self, piece: _Piece, at: int, reply: dict[str, Any] | None) -> None:
        """Fill ``piece`` with bytes ``at`` to the end of its range (``reply``: already asked for)."""
        download, length = self._download, min(_RANGE, self._size - at)
        try:
            if reply is None:
                reply = download._get(self._s3, f"bytes={at}-{at + length - 1}", self._pin)
                if reply is None:
                    raise StorageError(f"object storage says {download.url} ends before byte {at}, within its size")
            try:
                if reply.get("ContentRange") != f"bytes {at}-{at + length - 1}/{self._size}":
                    raise StorageError(f"object storage sent another range of {download.url} than the one asked for")
                if any(reply.get(k) != self._pin.get(pin) for k, pin in _PINNED if pin in self._pin):
                    raise StorageError(f"{download.url} changed while it was imported: import it again")
                n = 0
                while chunk := download._read(reply["Body"], length - n):
                    piece.put(chunk)
                    n += len(chunk)
                if n < length:
                    raise StorageError(f"object storage cut a piece of {download.url} short")
            finally:
                download._release(reply)
        except BaseException as exc:
            piece.end(exc)
        else:
            piece.end(None)


class _Piece:
    """One ranged GET's bytes as they arrive, taken by one reader in order; once ended,
    nothing more is added."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._done = False
        self._error: BaseException | None = None

    def put(self, chunk: bytes) -> None:
        with self._cond:
            if not self._done:
                self._chunks.append(chunk)
                self._cond.notify()

    def end(self, error: BaseException | None) -> None:
        with self._cond:
            if not self._done:
                self._done, self._error = True, error
                if error is not None:
                    self._chunks.clear()
                self._cond.notify()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._chunks and not self._done:
                    self._cond.wait()
                if not self._chunks:
                    if self._error is not None:
                        raise self._error
                    return
                chunk = self._chunks.popleft()
            yield chunk


def _status(exc: Exception) -> int | None:
    """The HTTP status of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)  # (None on a timeout or a dropped connection)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


def _code(exc: Exception) -> str | None:
    """The S3 error code of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


async def delete(url: ObjectURL) -> None:
    """Delete an object (done if it is already gone)."""
    try:
        await asyncio.to_thread(client().delete_object, Bucket=url.bucket, Key=url.key)
    except Exception as exc:
        err = _error(exc, url)
        if not isinstance(err, NotFound):
            raise err from exc


# -- REST callers -------------------------------------------------------------------
REST_PREFIXES = "BOXVM_REST_OBJECTS"  # the server's opt-in: comma-separated s3://bucket/[prefix/]


def for_rest_caller(url: str) -> str:
    """Check an object a REST caller names for the server to export to or import from: like
    a host path, it must lie under a prefix the server's operator listed in
    ``$BOXVM_REST_OBJECTS`` (nothing by default), since the server uses its own credentials."""
    target = parse(url)
    prefixes = [p.strip() for p in os.environ.get(REST_PREFIXES, "").split(",") if p.strip().startswith(SCHEME)]
    if not within(target, prefixes):
        raise InvalidArgument(
            f"{target} is not open to REST callers on this server: its operator lists the allowed "
            f"s3://bucket/prefix/ in {REST_PREFIXES}"
        )
    return str(target)
