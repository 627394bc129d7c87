"""The REST API: every operation of the Python API under ``/v1``, over any ``Backend``.

The protocol (version, capabilities, request bodies, exec frames) is ``boxvm.wire``.
Results are the public dataclasses as JSON; errors are ``{"error": {type, code, message,
status}}`` from the one error hierarchy, so the client raises the same classes again.
Archives and file trees are the backend's byte streams, relayed as they come: memory does
not grow with their size. Exec is a WebSocket. What is specific to serving this host's
home (the image gate, the idempotency table, the paths to scrub) is wired in
``boxvm.server.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

import boxvm
from boxvm import faults, objstore, wire
from boxvm.backends.base import Backend
from boxvm.errors import (
    BoxNotFound,
    BoxvmError,
    EngineError,
    InvalidArgument,
    NotFound,
    SnapshotNotFound,
    Unauthorized,
)
from boxvm.images.registry import for_remote_caller
from boxvm.options import (
    BoxInfo,
    DiskUsage,
    ExportOptions,
    ImageInfo,
    SnapshotInfo,
    TemplateInfo,
    check_box_id,
    check_migration_nonce,
    check_template_id,
)
from boxvm.server.guard import HostOriginGuard, Scrubber, check_ports
from boxvm.streams import ByteStream
from boxvm.wire import (
    CloneRequest,
    CreateRequest,
    LeaseRequest,
    ObjectExport,
    ObjectImport,
    PullRequest,
    ServerConfig,
    SnapshotRequest,
    StopRequest,
    TemplateRequest,
)

Key = Annotated[str | None, Header(alias=wire.IDEMPOTENCY_HEADER)]
Holder = Annotated[str | None, Query(description="the migration this request is part of, if one holds the box")]
bearer = HTTPBearer(auto_error=False, description="the token `boxvm serve` was started with")
log = logging.getLogger("boxvm.server")


class ResponseStore(Protocol):
    """Where idempotent responses are kept (``boxvm.store.Store`` keeps them a day in SQLite)."""

    def get_response(self, scope: str, key: str) -> tuple[str, int, str] | None: ...

    def put_response(self, scope: str, key: str, fingerprint: str, status: int, body: str) -> None: ...


class StreamResponse(StreamingResponse):
    """A backend's byte stream as the response body, closed however the response ends
    (finished, failed, or the client gone before or while it was sent), so the operation
    producing it never waits on a reader that left."""

    def __init__(self, stream: ByteStream, media_type: str) -> None:
        super().__init__(stream, media_type=media_type)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()


class Idempotency:
    """Replays the stored response of a request retried with the same ``Idempotency-Key``.

    Requests with one key run one at a time (a retry that overtakes a slow first attempt
    waits for it), and only successes are stored, so a failed attempt can be retried.
    """

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self.locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}  # lock, requests using it

    @staticmethod
    def fingerprint(what: Any) -> str:
        """What identifies a request under its key (its body, as JSON)."""
        return hashlib.sha256(json.dumps(jsonable_encoder(what), sort_keys=True).encode()).hexdigest()

    async def run(self, request: Request, key: str | None, what: Any, call: Any, status: int = 200) -> Response:
        if key is None:
            return JSONResponse(jsonable_encoder(await call()), status_code=status)
        if not 0 < len(key) <= 200:
            raise InvalidArgument("Idempotency-Key must be 1-200 characters")
        scope = f"{request.method} {request.url.path}"
        fingerprint = self.fingerprint(what)
        lock, users = self.locks.get((scope, key), (asyncio.Lock(), 0))
        self.locks[(scope, key)] = (lock, users + 1)
        try:
            async with lock:
                stored = self.store.get_response(scope, key)
                if stored is not None:
                    if stored[0] != fingerprint:
                        raise InvalidArgument(
                            f"Idempotency-Key {key!r} was already used for a different request: use a new key"
                        )
                    return Response(
                        stored[2], stored[1], media_type="application/json", headers={"Idempotent-Replayed": "true"}
                    )
                body = json.dumps(jsonable_encoder(await call()))
                self.store.put_response(scope, key, fingerprint, status, body)
                return Response(body, status, media_type="application/json")
        finally:
            lock, users = self.locks[(scope, key)]
            if users == 1:
                del self.locks[(scope, key)]
            else:
                self.locks[(scope, key)] = (lock, users - 1)


def create_app(
    backend: Backend,
    token: str | None,
    *,
    responses: ResponseStore,
    port_range: tuple[int, int] | None = None,
    private_paths: Sequence[Path] = (),
) -> FastAPI:
    """The app for ``backend``; ``token`` None means no authentication (loopback only: then
    only requests whose ``Host`` is a loopback name or address get through). Idempotent
    responses are kept in ``responses``; host ports only in ``port_range``
    (``boxvm.server.guard``); ``private_paths`` (the server's data and image directories)
    never appear in messages sent to callers. A LocalBackend is served through
    ``boxvm.server.run.local_app``, which also closes its image store to server paths."""
    app = FastAPI(
        title="boxvm",
        version=boxvm.__version__,
        summary="Micro-VM sandboxes with first-class state",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    idempotency = Idempotency(responses)
    scrub = Scrubber(private_paths)
    app.add_middleware(HostOriginGuard, check_host=token is None)
    expected = f"Bearer {token}".encode() if token else None

    def authorized(header: str | None) -> bool:
        return expected is None or (header is not None and hmac.compare_digest(header.encode(), expected))

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not authorized(f"{creds.scheme} {creds.credentials}" if creds else None):
            raise Unauthorized("a valid bearer token is required (Authorization: Bearer <token>)")

    @app.exception_handler(BoxvmError)
    async def boxvm_error(_request: Request, exc: BoxvmError) -> JSONResponse:
        return JSONResponse({"error": scrub.error(exc)}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        error = InvalidArgument(f"bad request: {where}: {first.get('msg', 'invalid')}")
        return JSONResponse({"error": scrub.error(error)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFound("no such API route") if exc.status_code == 404 else BoxvmError(str(exc.detail))
        body = scrub.error(error) | {"status": exc.status_code}
        return JSONResponse({"error": body}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        """A bug or an unexpected failure: the caller learns nothing of it, the log does."""
        log.error("unexpected error in a REST request", exc_info=exc)
        error = BoxvmError("internal server error: the server log has the details")
        return JSONResponse({"error": error.to_dict()}, status_code=500)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @v1.get("/config")
    async def config() -> ServerConfig:
        offered = [*wire.CAPABILITIES, wire.MIGRATION_CAPABILITY, wire.LEASE_CAPABILITY]
        return ServerConfig(boxvm.__version__, wire.API_VERSION, offered)

    # -- boxes ----------------------------------------------------------------------
    @v1.get("/boxes")
    async def list_boxes() -> list[BoxInfo]:
        return await backend.list()

    @v1.post("/boxes", status_code=201, response_model=BoxInfo)
    async def create(request: Request, body: CreateRequest, key: Key = None) -> Response:
        check_ports(body.options.validate().ports, port_range)
        with for_remote_caller():  # an image it pulls gets none of the server's registry settings
            return await idempotency.run(request, key, body, lambda: backend.create(body.options, body.name), 201)

    @v1.get("/boxes/{box}")
    async def get(box: str) -> BoxInfo:
        info = await backend.get(box)
        if info is None:
            raise BoxNotFound(f"no box named or with id {box!r}")
        return info

    @v1.delete("/boxes/{box}", status_code=204)
    async def remove(box: str, force: bool = False, holder: Holder = None) -> None:
        """``holder``: the migration removing the box, if one holds it (409 for any other)."""
        await backend.remove(box, force, holder)

    @v1.post("/boxes/{box}/start")
    async def start(box: str) -> BoxInfo:
        return await backend.start(box)

    @v1.post("/boxes/{box}/stop")
    async def stop(box: str, body: StopRequest | None = None) -> BoxInfo:
        return await backend.stop(box, (body or StopRequest()).timeout)

    @v1.post("/boxes/{box}/pause")
    async def pause(box: str) -> BoxInfo:
        return await backend.pause(box)

    @v1.post("/boxes/{box}/resume")
    async def resume(box: str) -> BoxInfo:
        return await backend.resume(box)

    @v1.post("/boxes/{box}/suspend")
    async def suspend(box: str) -> BoxInfo:
        return await backend.suspend(box)

    @v1.put("/boxes/{box}/lease", status_code=204)
    async def take_lease(box: str, body: LeaseRequest) -> None:
        """Hold the box for one migration (by its holder): 409 if another holds it."""
        await backend.lease(box, body.holder)

    @v1.delete("/boxes/{box}/lease", status_code=204)
    async def release_lease(box: str, holder: Annotated[str | None, Query()] = None) -> None:
        """Release the box from the migration ``holder`` (409 if another holds it), or
        without one from whichever holds it (a move known to be given up on)."""
        await backend.release_lease(box, holder)

    @v1.get("/boxes/{box}/logs", response_class=PlainTextResponse)
    async def logs(box: str) -> str:
        return await backend.logs(box)

    # -- files ----------------------------------------------------------------------
    @v1.put("/boxes/{box}/files", status_code=204)
    async def put_files(box: str, request: Request, path: Annotated[str, Query()]) -> None:
        """Unpack the tar stream in the request body at ``path`` in the box."""
        await backend.put_files(box, path, _body(request))

    @v1.get("/boxes/{box}/files", response_class=StreamingResponse)
    async def get_files(box: str, path: Annotated[str, Query()]) -> StreamingResponse:
        """``path`` in the box as a tar stream."""
        return StreamResponse(await backend.get_files(box, path), "application/x-tar")

    # -- snapshots ------------------------------------------------------------------
    @v1.post("/boxes/{box}/snapshots", status_code=201, response_model=SnapshotInfo)
    async def snapshot_create(box: str, request: Request, body: SnapshotRequest, key: Key = None) -> Response:
        return await idempotency.run(
            request, key, body, lambda: backend.snapshot_create(box, body.name, body.options), 201
        )

    @v1.get("/boxes/{box}/snapshots")
    async def snapshot_list(box: str) -> list[SnapshotInfo]:
        return await backend.snapshot_list(box)

    @v1.get("/boxes/{box}/snapshots/{name}")
    async def snapshot_get(box: str, name: str) -> SnapshotInfo:
        snap = await backend.snapshot_get(box, name)
        if snap is None:
            raise SnapshotNotFound(f"box {box!r} has no snapshot named {name!r}")
        return snap

    @v1.delete("/boxes/{box}/snapshots/{name}", status_code=204)
    async def snapshot_remove(box: str, name: str) -> None:
        await backend.snapshot_remove(box, name)

    @v1.post("/boxes/{box}/snapshots/{name}/restore")
    async def snapshot_restore(box: str, name: str) -> BoxInfo:
        return await backend.snapshot_restore(box, name)

    # -- clone, export, import ------------------------------------------------------
    @v1.post("/boxes/{box}/clone", status_code=201, response_model=list[BoxInfo])
    async def clone(box: str, request: Request, body: CloneRequest, key: Key = None) -> Response:
        return await idempotency.run(request, key, body, lambda: backend.clone(box, body.names, body.options), 201)

    @v1.post("/boxes/{box}/export", response_class=StreamingResponse)
    async def export(box: str, body: ExportOptions | None = None, holder: Holder = None) -> StreamingResponse:
        """The archive, streamed while it is produced. Errors before its first byte are
        JSON errors; a failure later cuts the stream short (the client sees it)."""
        stream = await backend.export_stream(box, body or ExportOptions(), holder)
        return StreamResponse(stream, "application/octet-stream")

    @v1.post("/boxes/import", status_code=201, response_model=BoxInfo)
    async def import_box(
        request: Request, name: str | None = None, box_id: str | None = None, nonce: str | None = None, key: Key = None
    ) -> Response:
        """Create a box from the archive in the request body. The upload is verified
        completely before the box exists, and always imported as untrusted. ``box_id``: the
        id it keeps (a box migrating here, ``boxvm.migrate``; refused if taken), given only
        with ``nonce``, the migration's mark on the box."""
        _check_migration(box_id, nonce)

        async def run() -> BoxInfo:
            info = await backend.import_stream(lambda: _body(request), name, True, "the upload", box_id, nonce)
            faults.point("import:committed")  # the box exists, the caller has not heard yet
            return info

        return await idempotency.run(request, key, {"name": name, "box_id": box_id, "nonce": nonce}, run, 201)

    @v1.post("/boxes/{box}/export-object", status_code=201)
    async def export_object(
        box: str, request: Request, body: ObjectExport, key: Key = None, holder: Holder = None
    ) -> Response:
        """Upload the archive to object storage with the server's credentials (create-only),
        to an object under a prefix the operator opened (``boxvm.objstore.for_rest_caller``)."""
        url = objstore.for_rest_caller(body.url)

        async def run() -> dict[str, str]:
            return {"url": await backend.export_object(box, url, body.options, holder)}

        what = body if holder is None else {"body": body, "holder": holder}
        return await idempotency.run(request, key, what, run, 201)

    @v1.post("/boxes/import-object", status_code=201, response_model=BoxInfo)
    async def import_object(request: Request, body: ObjectImport, key: Key = None) -> Response:
        """Create a box from an archive object the server reads (same prefixes as export;
        always imported as untrusted)."""
        _check_migration(body.box_id, body.nonce)
        url = objstore.for_rest_caller(body.url)

        async def run() -> BoxInfo:
            return await backend.import_object(url, body.name, True, body.box_id, body.nonce)

        return await idempotency.run(request, key, body, run, 201)

    # -- warm-start templates -----------------------------------------------------
    @v1.get("/templates")
    async def template_list() -> list[TemplateInfo]:
        return [_for_caller(t) for t in await backend.template_list()]

    @v1.post("/templates", status_code=201, response_model=TemplateInfo)
    async def template_create(request: Request, body: TemplateRequest, key: Key = None) -> Response:
        """Boot a box of this machine cold and keep it, suspended at agent-ready, as the
        machine's template (replacing an older one): first starts of such boxes resume it.
        The same image rules as ``POST /boxes``; env and ports are not part of a template."""
        options = body.options.validate()

        async def run() -> TemplateInfo:
            return _for_caller(await backend.template_create(options))

        with for_remote_caller():  # an image it pulls gets none of the server's registry settings
            return await idempotency.run(request, key, body, run, 201)

    @v1.delete("/templates/{template}", status_code=204)
    async def template_remove(template: str) -> None:
        await backend.template_remove(check_template_id(template))

    # -- images -------------------------------------------------------------------
    @v1.post("/images/pull")
    async def image_pull(body: PullRequest) -> ImageInfo:
        with for_remote_caller():  # the caller's credentials only; see boxvm.images.registry
            return await backend.image_pull(body.reference, body.username, body.password, body.insecure)

    @v1.get("/images")
    async def image_list() -> list[ImageInfo]:
        return await backend.image_list()

    @v1.delete("/images", status_code=204)
    async def image_remove(reference: Annotated[str, Query()]) -> None:
        await backend.image_remove(reference)

    @v1.get("/disk-usage")
    async def disk_usage() -> DiskUsage:
        return await backend.disk_usage()

    app.include_router(v1)

    # -- exec -----------------------------------------------------------------------
    @app.websocket("/v1/boxes/{box}/exec")
    async def exec_ws(ws: WebSocket, box: str) -> None:
        """First text frame from the client: ``{argv, env, cwd, user, timeout, tty, size}``.
        Then binary frames (first byte: 0 stdin, 1 stdout, 2 stderr) and JSON control
        frames (client: close_stdin, signal, resize; server: started, exit, error)."""
        if not authorized(ws.headers.get("authorization")):
            await ws.close(code=wire.WS_POLICY_VIOLATION, reason="a valid bearer token is required")
            return
        await ws.accept()
        try:
            spec = wire.ExecRequest.parse(await ws.receive_json())
            chan = await backend.spawn(
                box,
                spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                user=spec.user,
                timeout=spec.timeout,
                tty=spec.tty,
                size=spec.size,
            )
        except WebSocketDisconnect:
            return
        except (KeyError, TypeError, ValueError) as exc:
            await _fail(ws, InvalidArgument(f"bad exec request: {exc}"), scrub)
            return
        except BoxvmError as exc:
            await _fail(ws, exc, scrub)
            return
        await ws.send_json({"type": "started"})

        async def forward(stream: Any, tag: int) -> None:
            prefix = bytes([tag])
            async for chunk in stream:
                await ws.send_bytes(prefix + chunk)

        async def inbound() -> None:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await chan.write(message["bytes"][1:])
                    continue
                control = json.loads(message.get("text") or "{}")
                if control.get("type") == "close_stdin":
                    chan.close_stdin()
                elif control.get("type") == "signal":
                    chan.signal(int(control["signum"]))
                elif control.get("type") == "resize":
                    chan.resize(int(control["rows"]), int(control["cols"]))

        outputs = asyncio.ensure_future(
            asyncio.gather(forward(chan.stdout, wire.STDOUT), forward(chan.stderr, wire.STDERR))
        )
        reader = asyncio.ensure_future(inbound())
        try:
            await asyncio.wait({outputs, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():  # the client left (or sent garbage) before the process ended
                chan.signal(signal.SIGKILL)
                return
            try:
                await outputs
                result = await chan.wait()
            except BoxvmError as exc:  # e.g. an unknown user, found by the guest
                await _fail(ws, exc, scrub)
                return
            await ws.send_json({"type": "exit", **result})
            await ws.close()
        except (WebSocketDisconnect, RuntimeError, OSError):
            chan.signal(signal.SIGKILL)
        finally:
            for task in (outputs, reader):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    return app


def _for_caller(info: TemplateInfo) -> TemplateInfo:
    """A template as a caller sees it: an image that is a server path is not named."""
    if info.image.startswith(("/", ".", "~")):
        return dataclasses.replace(info, image="<server path>")
    return info


def _check_migration(box_id: str | None, nonce: str | None) -> None:
    """A caller-chosen id only with a migration's nonce: the nonce, stored in the box's record,
    is what tells the migration its own import from a box someone else put under that id."""
    if (box_id is None) != (nonce is None):
        raise InvalidArgument("box_id and nonce go together (a migration's import): give both or neither")
    if box_id is not None and nonce is not None:
        check_box_id(box_id)
        check_migration_nonce(nonce)


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request's body; a caller gone mid-upload (a migration's source or driver killed)
    is an ordinary failure of the upload, not a server error with a traceback."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise EngineError("the caller went away before the upload ended; nothing was kept") from None


async def _fail(ws: WebSocket, exc: BoxvmError, scrub: Scrubber) -> None:
    with contextlib.suppress(Exception):
        await ws.send_json({"type": "error", "error": scrub.error(exc)})
        await ws.close()
