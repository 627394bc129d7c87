"""The REST protocol, the one place server (``boxvm.server.app``) and client
(``boxvm.backends.remote``) take it from: API version and capabilities, connection timing,
exec frame tags, request bodies, and the result dataclasses rebuilt from the server's JSON
(FastAPI encodes them there). Errors travel as ``BoxvmError.to_dict`` envelopes
(``boxvm.errors``).

Plain dataclasses, no FastAPI: the client imports this module without the server's
dependencies. Fields the client does not know are ignored, so a newer server can add some.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from boxvm.errors import EngineError
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
)
from boxvm.status import BoxStatus

T = TypeVar("T")

API_VERSION = 1
# What a server offers and a client needs: a client refuses a server that lacks one.
CAPABILITIES = (
    "lifecycle", "exec-ws", "files", "snapshots", "clone", "export-stream", "import-stream", "idempotency", "images",
)  # fmt: skip

# Offered by a server that imports a box under its id with a migration's nonce (``boxvm.migrate``
# checks it before it begins a move to the server; an older client need not know it).
MIGRATION_CAPABILITY = "import-migration"
# Offered by a server that holds a box for one migration at a time (``Backend.lease``).
LEASE_CAPABILITY = "migration-lease"


@dataclass
class LeaseRequest:
    holder: str  # 64 hex digits derived from the move's nonce (never the nonce itself)


# Idle HTTP connections: the client drops them well before the server does. With both at
# 5 s (the httpx and uvicorn defaults) a request sent on a connection the server was just
# closing failed with a ReadError, and a start or stop cannot be retried blindly.
SERVER_KEEPALIVE_SECS = 30
CLIENT_KEEPALIVE_SECS = 10

# Exec WebSocket: binary frames start with the stream they carry; text frames are JSON
# control messages with a "type" (client: close_stdin, signal, resize; server: started,
# exit, error).
STDIN, STDOUT, STDERR = 0, 1, 2
WS_MAX_MESSAGE = 16 << 20  # bytes of one exec WebSocket message from a server (its output chunks are <= 1 MiB)
WS_POLICY_VIOLATION = 1008  # the close code of an exec WebSocket refused for its token
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass
class ServerConfig:
    version: str
    api: int
    capabilities: list[str]


@dataclass
class CreateRequest:
    options: BoxOptions = field(default_factory=BoxOptions)
    name: str | None = None


@dataclass
class StopRequest:
    timeout: float = 10.0


@dataclass
class SnapshotRequest:
    name: str
    options: SnapshotOptions = field(default_factory=SnapshotOptions)


@dataclass
class CloneRequest:
    names: list[str | None] = field(default_factory=lambda: [None])
    options: CloneOptions = field(default_factory=CloneOptions)


@dataclass
class ObjectExport:
    url: str  # s3://bucket/key
    options: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class ObjectImport:
    url: str
    name: str | None = None
    box_id: str | None = None  # the id the box keeps (a migration: ``boxvm.migrate``)
    nonce: str | None = None  # the migration's own mark on the box, required with box_id


@dataclass
class TemplateRequest:
    """``POST /v1/templates``: the machine to make a warm-start template for."""

    options: BoxOptions = field(default_factory=BoxOptions)


@dataclass
class PullRequest:
    reference: str
    username: str | None = None
    password: str | None = None
    insecure: bool = False


@dataclass
class ExecRequest:
    """The first (text) frame of an exec WebSocket."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None
    tty: bool = False
    size: tuple[int, int] | None = None

    @classmethod
    def parse(cls, data: Any) -> ExecRequest:
        """From a caller's JSON; raises KeyError, TypeError or ValueError when malformed."""
        if not isinstance(data, dict):
            raise TypeError("the exec request must be a JSON object")
        size = data.get("size")
        return cls(
            argv=[str(a) for a in data["argv"]],
            env=data.get("env"),
            cwd=data.get("cwd"),
            user=data.get("user"),
            timeout=data.get("timeout"),
            tty=bool(data.get("tty")),
            size=(int(size[0]), int(size[1])) if size else None,
        )


def body(request: Any) -> dict[str, Any]:
    """A request dataclass as the JSON the server expects."""
    return dataclasses.asdict(request)


def _known(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    return {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}


def _from_peer(parse: Callable[[Any], T]) -> Callable[[Any], T]:
    """A parser of a server's reply that fails as EngineError, not as whatever a reply of
    the wrong shape (a list for an object, a string for a number) raises inside it."""

    @functools.wraps(parse)
    def checked(data: Any) -> T:
        try:
            return parse(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            what = parse.__name__.replace("_", " ")
            raise EngineError(f"the server sent a malformed {what} ({type(exc).__name__}: {exc})"[:300]) from None

    return checked


def many(parse: Callable[[Any], T], data: Any) -> list[T]:
    """A list reply, each item parsed by ``parse``; EngineError if it is not a list."""
    if not isinstance(data, list):
        raise EngineError(f"the server sent {type(data).__name__} where a list was due")
    return [parse(item) for item in data]


@_from_peer
def box_info(data: dict[str, Any]) -> BoxInfo:
    values = _known(BoxInfo, data)
    values["status"] = BoxStatus(values["status"])
    values["ports"] = [tuple(p) for p in values.get("ports") or []]
    return BoxInfo(**values)


@_from_peer
def snapshot_info(data: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(**_known(SnapshotInfo, data))


@_from_peer
def image_info(data: dict[str, Any]) -> ImageInfo:
    return ImageInfo(**_known(ImageInfo, data))


@_from_peer
def template_info(data: dict[str, Any]) -> TemplateInfo:
    return TemplateInfo(**_known(TemplateInfo, data))


@_from_peer
def disk_usage(data: dict[str, Any]) -> DiskUsage:
    return DiskUsage(
        boxes={k: (v[0], v[1]) for k, v in data["boxes"].items()},
        snapshots={k: (v[0], v[1]) for k, v in data["snapshots"].items()},
        layers_bytes=data["layers_bytes"],
    )
