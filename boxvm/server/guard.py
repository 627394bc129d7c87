"""What the REST boundary refuses before anything runs, and what it never says.

- ``Host``/``Origin``: a browser page can reach a loopback server (a WebSocket needs no
  CORS consent; DNS rebinding makes any page "same-origin" with it). Every request with a
  foreign ``Origin`` is refused, and without a token so is every ``Host`` that is not a
  loopback name or address: 403 before any route runs (a WebSocket handshake gets the
  same HTTP 403).
- Images: over REST a string is a registry reference; a server path is refused with one
  fixed error (no oracle on the server's files) unless it lies under a directory the
  operator allowed, checked component by component from a directory fd.
- Host ports: only inside the range the operator allowed (none by default).
- Error messages: the server's own paths (home, working directory, installation, allowed
  image directories) are replaced before a message leaves, as a second line of defence.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

import boxvm
from boxvm.errors import BoxvmError, InvalidArgument, Unauthorized
from boxvm.localauth import is_loopback

NO_SERVER_PATHS = (
    "over REST an image is a registry reference (e.g. alpine:3.20), or none for the built-in image; "
    "this server reads no image from its own files outside the directories its operator allowed "
    "(boxvm serve --allow-image-dir)"
)


def split_host(value: str) -> str | None:
    """The host part of a ``Host`` header or an origin's netloc (no port, no brackets)."""
    try:
        host = urlsplit(f"//{value}").hostname
    except ValueError:
        return None
    return host or None


def refusal(headers: Headers, scheme: str, check_host: bool) -> str | None:
    """Why a request must not reach any route, or None."""
    host = headers.get("host", "")
    if check_host and not ((name := split_host(host)) and is_loopback(name)):
        return "this server has no token and answers only requests to its loopback address (Host header)"
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin) if origin != "null" else None
        web = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        if parts is None or parts.scheme != web or parts.netloc.lower() != host.lower() or parts.path:
            return "requests from another web origin are refused (Origin header)"
    return None


class HostOriginGuard:
    """ASGI middleware applying :func:`refusal` to HTTP requests and WebSocket handshakes."""

    def __init__(self, app: ASGIApp, check_host: bool) -> None:
        self.app = app
        self.check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            why = refusal(Headers(scope=scope), scope.get("scheme", "http"), self.check_host)
            if why is not None:
                body = {**Unauthorized(why).to_dict(), "status": 403}
                # On a WebSocket scope this is the ASGI denial response: an HTTP 403 handshake answer.
                await JSONResponse({"error": body}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def image_gate(dirs: Sequence[Path]) -> Callable[[str], Path]:
    """The check :class:`boxvm.images.ImageStore` applies to every image string that is a path.

    A path is accepted only when it is absolute, lies under one of ``dirs`` and reaches an
    existing directory or file there through real directories (no ``..``, no symlinks,
    checked on fds). Everything else gets the same error, whatever exists on the server.
    """
    roots = tuple(Path(d).absolute() for d in dirs)

    def gate(reference: str) -> Path:
        path = Path(reference)
        if path.is_absolute():
            for root in roots:
                rest = path.parts[len(root.parts) :]
                if path.parts[: len(root.parts)] == root.parts and rest and _beneath(root, rest):
                    return root.joinpath(*rest)
        raise InvalidArgument(NO_SERVER_PATHS)

    return gate


def _beneath(root: Path, parts: Sequence[str]) -> bool:
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for i, part in enumerate(parts):
            if part in ("", ".", ".."):
                return False
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISDIR(mode) or (i == len(parts) - 1 and stat.S_ISREG(mode))):
                return False  # a symlink, a device, or a file where a directory belongs
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def check_ports(ports: Sequence[tuple[int, int]], allowed: tuple[int, int] | None) -> None:
    """Refuse host ports outside the operator's range: forwarding binds them on the server."""
    for host, _guest in ports:
        if allowed is None:
            raise InvalidArgument(
                "this server forwards no ports: its operator can allow a range with `boxvm serve --port-range`"
            )
        if not allowed[0] <= host <= allowed[1]:
            raise InvalidArgument(
                f"host port {host} is outside the range this server allows ({allowed[0]}-{allowed[1]})"
            )


def parse_port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise InvalidArgument(f"port range {text!r}: use LOW-HIGH within 1-65535, e.g. 20000-20999")
    return int(low), int(high)


class Scrubber:
    """Replaces the server's own paths in messages sent to callers.

    Deterministic (no look at the filesystem, so no oracle). Guest paths pass unless they
    share a prefix with these, which is why top-level directories (``/usr``, ``/root``) are
    not on the list.
    """

    def __init__(self, private: Sequence[Path]) -> None:
        """``private``: the server's own directories (home, allowed image directories)."""
        always = [*private, *(Path(os.path.realpath(p)) for p in private)]
        if sys.prefix != sys.base_prefix:  # a virtualenv: its path names the deployment
            always.append(Path(sys.prefix))
        # The working and install directories only when specific: "/" or "/srv" would eat guest paths.
        shallow = [p for p in (Path.cwd(), Path(boxvm.__file__).parent.parent) if len(p.absolute().parts) > 2]
        prefixes = sorted({str(p.absolute()) for p in [*always, *shallow] if p.absolute() != Path("/")}, key=len)
        prefixes.reverse()
        alternatives = "|".join(re.escape(p) for p in prefixes)
        self._pattern = re.compile(rf"(?:{alternatives})(?![^/\s'\":,])[^\s'\":,]*") if prefixes else None

    def __call__(self, message: str) -> str:
        return self._pattern.sub("<server path>", message) if self._pattern else message

    def error(self, exc: BoxvmError) -> dict[str, object]:
        return {**exc.to_dict(), "message": self(exc.message)}
