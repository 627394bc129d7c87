"""The remote backend: the same Backend contract over a boxvm REST server.

Requests go through one ``httpx.AsyncClient``; error envelopes become the very
exception classes the server raised. Calls that create something (create, clone,
import, snapshot create) carry an ``Idempotency-Key`` and are retried on transport
errors with the same key, so a lost response never makes a second box. Archives and
file trees stream both ways; exec is a WebSocket. What client and server agree on lives in
``boxvm.wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from boxvm import wire
from boxvm.backends.base import Backend, ProcessChannel
from boxvm.errors import (
    BoxNotFound,
    BoxvmError,
    EngineError,
    InvalidArgument,
    SnapshotNotFound,
    Unauthorized,
    Unsupported,
    from_dict,
)
from boxvm.localauth import is_loopback, read_token
from boxvm.options import (
    BoxInfo,
    BoxOptions,
    CloneOptions,
    DiskUsage,
    ExportOptions,
    ImageInfo,
    SnapshotInfo,
    SnapshotOptions,
    TemplateInfo,
    check_template_id,
)
from boxvm.paths import Home
from boxvm.streams import ByteStream

RETRIES = 3
_CHUNK = 1 << 20
_REPLY_MAX = 64 << 20  # bytes of a JSON reply (a list of 10 000 boxes is ~10 MB)
_ERROR_MAX = 64 << 10  # bytes of an error reply
_FIRST_MESSAGE_S = 60.0  # a server says "started" as soon as the guest took the process


class RemoteProcess(ProcessChannel):
    """A process on a server, over one WebSocket. Output waits in small bounded queues,
    so a reader that falls behind slows the server (and the guest) instead of growing
    memory, as a local process does."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._queues: dict[int, asyncio.Queue[bytes | None]] = {
            wire.STDOUT: asyncio.Queue(16),
            wire.STDERR: asyncio.Queue(16),
        }
        self._result: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())
        self.stdout = self._drain(wire.STDOUT)
        self.stderr = self._drain(wire.STDERR)

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if self._result.done():
                    continue  # the process ended: the server has nothing more to say
                if isinstance(message, bytes):
                    if not message or message[0] not in self._queues:
                        raise _malformed("output of no stream")
                    await self._queues[message[0]].put(message[1:])
                    continue
                control = _control(message)
                if control["type"] == "exit":
                    self._result.set_result(_exit(control))
                elif control["type"] == "error":
                    self._result.set_exception(from_dict(control.get("error")))
        except ConnectionClosed:
            pass
        except EngineError as exc:
            if not self._result.done():
                self._result.set_exception(exc)
            await self._ws.close()
        finally:
            if not self._result.done():
                self._result.set_exception(EngineError("the connection to the server closed before the process ended"))
            for queue in self._queues.values():
                await queue.put(None)

    async def _drain(self, stream: int) -> AsyncIterator[bytes]:
        while (chunk := await self._queues[stream].get()) is not None:
            yield chunk

    async def _send(self, message: bytes | str) -> None:
        async with self._send_lock:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(message)

    def _later(self, message: str) -> None:
        task = asyncio.create_task(self._send(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def write(self, data: bytes) -> None:
        if self._tasks:  # control frames sent before this write go first
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._send(bytes([wire.STDIN]) + data)

    def close_stdin(self) -> None:
        self._later(json.dumps({"type": "close_stdin"}))

    def signal(self, signum: int) -> None:
        self._later(json.dumps({"type": "signal", "signum": int(signum)}))

    def resize(self, rows: int, cols: int) -> None:
        self._later(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def wait(self) -> dict[str, object]:
        try:
            return await asyncio.shield(self._result)
        finally:
            if self._result.done():
                await self._ws.close()


class RemoteBackend(Backend):
    """``token`` None: for a server on a loopback address, the token ``boxvm serve`` generated
    in this user's home (``$BOXVM_HOME/server-token``), if there is one. An https server's
    certificate is verified against ``ca_bundle`` (a PEM file), else ``$BOXVM_CA_BUNDLE``,
    else the system's certificates (which ``$SSL_CERT_FILE`` replaces). ``transport`` replaces
    the network for HTTP requests (tests pass ``httpx.ASGITransport`` over an app in-process)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 900.0,
        ca_bundle: str | Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InvalidArgument(f"a server URL starts with http:// or https://, not {url!r}")
        if token is None and is_loopback(urlsplit(self.url).hostname or ""):
            token = read_token(Home.default())
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._tls = _tls_context(ca_bundle or os.environ.get("BOXVM_CA_BUNDLE") or None)
        self._http = httpx.AsyncClient(
            base_url=f"{self.url}/v1",
            headers=self._headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(keepalive_expiry=wire.CLIENT_KEEPALIVE_SECS),
            verify=self._tls,
            transport=transport,
        )
        self._checked: dict[str, Any] | None = None

    # -- plumbing -----------------------------------------------------------------------
    async def server_config(self) -> dict[str, Any]:
        """The server's version and capabilities (checked once, before any other call)."""
        if self._checked is None:
            config = await self._send("GET", "/config", check=False)
            if not isinstance(config, dict):
                raise Unsupported(f"{self.url} does not answer as a boxvm server (GET /v1/config): check the URL")
            missing = set(wire.CAPABILITIES) - set(config.get("capabilities", []))
            if config.get("api") != wire.API_VERSION or missing:
                raise Unsupported(
                    f"the server at {self.url} runs boxvm {config.get('version', '?')} with API "
                    f"{config.get('api', '?')}; this client needs API {wire.API_VERSION}"
                    + (f" and {sorted(missing)}" if missing else "")
                    + ": upgrade the server (or use a matching client)"
                )
            self._checked = config
        return self._checked

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        idempotent: bool = False,
        check: bool = True,
    ) -> Any:
        if check:
            await self.server_config()
        headers = {wire.IDEMPOTENCY_HEADER: uuid.uuid4().hex} if idempotent else {}
        attempts = RETRIES if idempotent or method == "GET" else 1
        for attempt in range(attempts):
            try:
                request = self._http.build_request(
                    method, path, json=json_body, params=params, headers=headers, content=content() if content else None
                )
                response = await self._http.send(request, stream=True)
                try:
                    body = await self._bounded(response)
                finally:
                    await response.aclose()
                break
            except httpx.TransportError as exc:
                if attempt == attempts - 1:
                    raise EngineError(f"cannot reach the boxvm server at {self.url}: {exc}") from exc
                await asyncio.sleep(0.2 * (attempt + 1))
        _raise_for_error(response.status_code, body)
        if response.status_code == 204 or not body:
            return None
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                return json.loads(body)
            except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
                raise EngineError(f"the boxvm server at {self.url} sent malformed JSON") from exc
        return body.decode(errors="replace")

    async def _bounded(self, response: httpx.Response) -> bytes:
        """A reply's body (decoded), refused past ``_REPLY_MAX`` bytes: a server, or anyone on
        an http:// path to it, could otherwise send without end into this process's memory.
        An error's is cut at ``_ERROR_MAX`` (a proxy's HTML page: its status still says what
        happened)."""
        error = response.status_code >= 400
        most = _ERROR_MAX if error else _REPLY_MAX
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > most:
                if error:
                    return bytes(body[:most])
                raise EngineError(f"the boxvm server at {self.url} sent a reply of over {most} bytes: refused")
        return bytes(body)

    # -- lifecycle ----------------------------------------------------------------------
    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo:
        body = wire.body(wire.CreateRequest(options.validate(), name))
        return wire.box_info(await self._send("POST", "/boxes", json_body=body, idempotent=True))

    async def get(self, id_or_name: str) -> BoxInfo | None:
        try:
            return wire.box_info(await self._send("GET", f"/boxes/{id_or_name}"))
        except BoxNotFound:
            return None

    async def list(self) -> list[BoxInfo]:
        return wire.many(wire.box_info, await self._send("GET", "/boxes"))

    async def remove(self, box_id: str, force: bool, holder: str | None = None) -> None:
        params: dict[str, object] = {"force": force, **_held(holder)}
        await self._send("DELETE", f"/boxes/{box_id}", params=params)

    async def start(self, box_id: str) -> BoxInfo:
        return wire.box_info(await self._send("POST", f"/boxes/{box_id}/start"))

    async def stop(self, box_id: str, timeout: float) -> BoxInfo:
        body = wire.body(wire.StopRequest(timeout))
        return wire.box_info(await self._send("POST", f"/boxes/{box_id}/stop", json_body=body))

    async def pause(self, box_id: str) -> BoxInfo:
        return wire.box_info(await self._send("POST", f"/boxes/{box_id}/pause"))

    async def resume(self, box_id: str) -> BoxInfo:
        return wire.box_info(await self._send("POST", f"/boxes/{box_id}/resume"))

    async def suspend(self, box_id: str) -> BoxInfo:
        return wire.box_info(await self._send("POST", f"/boxes/{box_id}/suspend"))

    async def logs(self, box_id: str) -> str:
        return str(await self._send("GET", f"/boxes/{box_id}/logs") or "")

    # -- exec and files -----------------------------------------------------------------
    async def spawn(
        self,
        box_id: str,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        timeout: float | None,
        tty: bool,
        size: tuple[int, int] | None,
    ) -> ProcessChannel:
        await self.server_config()
        url = "ws" + self.url[4:] + f"/v1/boxes/{box_id}/exec"
        try:
            ws = await connect(
                url,
                additional_headers=self._headers,
                max_size=wire.WS_MAX_MESSAGE,
                open_timeout=30,
                ssl=self._tls if url.startswith("wss:") else None,
            )
        except InvalidStatus as exc:
            if exc.response.status_code == 403:  # Host or Origin refused: the server says which
                with contextlib.suppress(ValueError, KeyError, TypeError, RecursionError):
                    raise from_dict(json.loads(exc.response.body or b"")["error"]) from exc
            if exc.response.status_code in (401, 403):
                raise _unauthorized() from exc
            raise EngineError(f"the server refused exec: HTTP {exc.response.status_code}") from exc
        except OSError as exc:
            raise EngineError(f"cannot reach the boxvm server at {self.url}: {exc}") from exc
        except WebSocketException as exc:  # a redirect elsewhere, a handshake that is not one
            raise EngineError(f"the server at {self.url} failed the exec's WebSocket handshake: {exc}") from exc
        try:
            await ws.send(json.dumps(wire.body(wire.ExecRequest(argv, env, cwd, user, timeout, tty, size))))
            try:
                message = await asyncio.wait_for(ws.recv(), _FIRST_MESSAGE_S)
            except TimeoutError:
                raise EngineError(f"the server did not start the process within {_FIRST_MESSAGE_S:g} s") from None
            first = _control(message)
            if first["type"] == "error":
                raise from_dict(first.get("error"))
            if first["type"] != "started":
                raise _malformed(f"a {str(first['type'])[:40]!r} message before the process started")
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == wire.WS_POLICY_VIOLATION:
                raise _unauthorized() from exc
            raise EngineError(f"the server closed the exec connection: {exc}") from exc
        except BoxvmError:
            await ws.close()
            raise
        return RemoteProcess(ws)

    async def put_files(self, box_id: str, box_path: str, tar: AsyncIterator[bytes]) -> None:
        await self._send("PUT", f"/boxes/{box_id}/files", params={"path": box_path}, content=lambda: tar)

    async def get_files(self, box_id: str, box_path: str) -> ByteStream:
        request = self._http.build_request("GET", f"/boxes/{box_id}/files", params={"path": box_path})
        return await self._download(request, box_path)

    async def _download(self, request: httpx.Request, what: str) -> ByteStream:
        """A streamed response body: errors before it are the server's, errors within it EngineError."""
        await self.server_config()
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise EngineError(f"cannot reach the boxvm server at {self.url}: {exc}") from exc
        try:
            if response.status_code >= 400:
                _raise_for_error(response.status_code, await self._bounded(response))
        except BaseException:
            await response.aclose()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_bytes(_CHUNK):
                    yield chunk
            except httpx.HTTPError as exc:
                raise EngineError(f"the server stopped sending {what}: {exc}") from exc

        return ByteStream(chunks(), response.aclose)

    # -- state --------------------------------------------------------------------------
    async def snapshot_create(self, box_id: str, name: str, options: SnapshotOptions) -> SnapshotInfo:
        body = wire.body(wire.SnapshotRequest(name, options))
        return wire.snapshot_info(
            await self._send("POST", f"/boxes/{box_id}/snapshots", json_body=body, idempotent=True)
        )

    async def snapshot_list(self, box_id: str) -> list[SnapshotInfo]:
        return wire.many(wire.snapshot_info, await self._send("GET", f"/boxes/{box_id}/snapshots"))

    async def snapshot_get(self, box_id: str, name: str) -> SnapshotInfo | None:
        try:
            return wire.snapshot_info(await self._send("GET", f"/boxes/{box_id}/snapshots/{name}"))
        except SnapshotNotFound:
            return None

    async def snapshot_restore(self, box_id: str, name: str) -> BoxInfo:
        return wire.box_info(await self._send("POST", f"/boxes/{box_id}/snapshots/{name}/restore"))

    async def snapshot_remove(self, box_id: str, name: str) -> None:
        await self._send("DELETE", f"/boxes/{box_id}/snapshots/{name}")

    async def clone(self, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxInfo]:
        body = wire.body(wire.CloneRequest(names, options))
        made = await self._send("POST", f"/boxes/{box_id}/clone", json_body=body, idempotent=True)
        return wire.many(wire.box_info, made)

    async def export_stream(self, box_id: str, options: ExportOptions, holder: str | None = None) -> ByteStream:
        options.validate()
        path, body = f"/boxes/{box_id}/export", wire.body(options)
        request = self._http.build_request("POST", path, json=body, params=_held(holder))
        return await self._download(request, f"the archive of {box_id!r}")

    async def import_stream(
        self,
        archive: Callable[[], AsyncIterator[bytes]],
        name: str | None,
        untrusted: bool,
        label: str,
        box_id: str | None = None,
        nonce: str | None = None,
    ) -> BoxInfo:
        """Upload an archive; the server verifies it before the box appears (always as
        untrusted: it cannot trust a client's host-specific options)."""
        params = {k: v for k, v in (("name", name), ("box_id", box_id), ("nonce", nonce)) if v}
        reply = await self._send("POST", "/boxes/import", params=params or None, content=archive, idempotent=True)
        return _kept(wire.box_info(reply), box_id, self.url)

    async def lease(self, box_id: str, holder: str) -> None:
        await self._leases()
        body = wire.body(wire.LeaseRequest(holder))  # a compare-and-set on one holder: safe to send again
        await self._send("PUT", f"/boxes/{box_id}/lease", json_body=body, idempotent=True)

    async def release_lease(self, box_id: str, holder: str | None) -> None:
        await self._leases()
        path = f"/boxes/{box_id}/lease"
        await self._send("DELETE", path, params=_held(holder) or None, idempotent=holder is not None)

    async def _leases(self) -> None:
        if wire.LEASE_CAPABILITY not in (await self.server_config()).get("capabilities", []):
            raise Unsupported(f"the server at {self.url} cannot hold a box for a migration: upgrade it")

    async def receives_migrations(self) -> bool:
        """A server too old to keep a migrating box's id and nonce would import it under a new id."""
        return wire.MIGRATION_CAPABILITY in (await self.server_config()).get("capabilities", [])

    async def export_object(self, box_id: str, url: str, options: ExportOptions, holder: str | None = None) -> str:
        """The server uploads the archive with its own credentials, to a prefix its operator
        opened (``BOXVM_REST_OBJECTS``): the bytes never pass through this client."""
        options.validate()
        body = wire.body(wire.ObjectExport(url, options))
        path = f"/boxes/{box_id}/export-object"
        reply = await self._send("POST", path, json_body=body, params=_held(holder) or None, idempotent=True)
        return str(reply["url"])

    async def import_object(
        self, url: str, name: str | None, untrusted: bool, box_id: str | None = None, nonce: str | None = None
    ) -> BoxInfo:
        """The server reads the object itself (same prefixes; always as untrusted)."""
        body = wire.body(wire.ObjectImport(url, name, box_id, nonce))
        info = wire.box_info(await self._send("POST", "/boxes/import-object", json_body=body, idempotent=True))
        return _kept(info, box_id, self.url)

    async def template_create(self, options: BoxOptions) -> TemplateInfo:
        """The server boots the template's box (a cold boot: seconds) and keeps it."""
        body = wire.body(wire.TemplateRequest(options.validate()))
        return wire.template_info(await self._send("POST", "/templates", json_body=body, idempotent=True))

    async def template_list(self) -> list[TemplateInfo]:
        return wire.many(wire.template_info, await self._send("GET", "/templates"))

    async def template_remove(self, template_id: str) -> None:
        await self._send("DELETE", f"/templates/{check_template_id(template_id)}")  # checked: a URL path segment

    async def disk_usage(self) -> DiskUsage:
        return wire.disk_usage(await self._send("GET", "/disk-usage"))

    async def image_pull(self, reference: str, username: str | None, password: str | None, insecure: bool) -> ImageInfo:
        body = wire.body(wire.PullRequest(reference, username, password, insecure))
        return wire.image_info(await self._send("POST", "/images/pull", json_body=body))

    async def image_list(self) -> list[ImageInfo]:
        return wire.many(wire.image_info, await self._send("GET", "/images"))

    async def image_remove(self, reference: str) -> None:
        await self._send("DELETE", "/images", params={"reference": reference})

    async def close(self) -> None:
        await self._http.aclose()


def _tls_context(ca_bundle: str | Path | None) -> ssl.SSLContext:
    """Certificate verification for https servers (hostname checked; never disabled)."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load the CA bundle {ca_bundle}: {exc}") from exc


def _unauthorized() -> BoxvmError:
    return Unauthorized("the server refused the token: pass the right one (token= or BOXVM_TOKEN)")


def _malformed(what: str) -> EngineError:
    return EngineError(f"the server sent a malformed exec message ({what}): is it a boxvm server?")


def _control(message: str | bytes) -> dict[str, Any]:
    """An exec's control message: a JSON object with a ``type``."""
    if isinstance(message, bytes):
        raise _malformed("output before the process started")
    try:
        control = json.loads(message)
    except (ValueError, RecursionError):
        raise _malformed("not JSON") from None
    if not isinstance(control, dict) or not isinstance(control.get("type"), str):
        raise _malformed("not an object with a type")
    return control


def _exit(control: dict[str, Any]) -> dict[str, object]:
    """An exit message's result, its fields checked: a process's status and whether it timed out."""
    code, timed_out = control.get("exit_code"), control.get("timed_out", False)
    if type(code) is not int or not 0 <= code <= 255 or not isinstance(timed_out, bool):
        raise _malformed("an exit without an exit_code of 0-255")
    return {"exit_code": code, "timed_out": timed_out}


def _raise_for_error(status: int, body: bytes) -> None:
    """The server's error, if the reply is one: its JSON envelope's, else the status."""
    if status < 400:
        return
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BoxvmError(f"HTTP {status} from the server: {body[:200].decode(errors='replace')}") from None
    raise from_dict(error)


def _held(holder: str | None) -> dict[str, str]:
    """The query naming the migration a request is part of (``Backend.lease``), if any; a
    server that holds no boxes for moves ignores it."""
    return {"holder": holder} if holder is not None else {}


def _kept(info: BoxInfo, box_id: str | None, url: str) -> BoxInfo:
    """An imported box that was to keep ``box_id`` did (a server too old to know it would not)."""
    if box_id is not None and info.id != box_id:
        raise Unsupported(f"the server at {url} cannot import a box under a given id: upgrade it")
    return info
