"""Running the REST server: this host's home behind the app, socket, authentication policy, TLS, uvicorn."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from boxvm.errors import InvalidArgument
from boxvm.localauth import ensure_token, is_loopback, token_path
from boxvm.paths import Home
from boxvm.wire import SERVER_KEEPALIVE_SECS

if TYPE_CHECKING:
    from fastapi import FastAPI

    from boxvm.backends.local import LocalBackend


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8100
    token: str | None = None  # None: the home's generated token (``server-token``), unless no_token
    no_token: bool = False  # no authentication at all: loopback only, and only loopback Host headers
    tls_cert: Path | None = None
    tls_key: Path | None = None
    image_dirs: tuple[Path, ...] = ()  # server directories whose OCI layouts/archives callers may name
    port_range: tuple[int, int] | None = None  # host ports callers may forward; None: none


def local_app(
    backend: LocalBackend,
    token: str | None,
    image_dirs: tuple[Path, ...] = (),
    port_range: tuple[int, int] | None = None,
) -> FastAPI:
    """The app serving this host's home: over REST an image is a registry reference, or a path
    under ``image_dirs`` (``boxvm.server.guard.image_gate``); idempotent responses are kept in
    the home's store; the home and image directories are scrubbed from messages."""
    from boxvm.server.app import create_app
    from boxvm.server.guard import image_gate

    backend.images.path_gate = image_gate(image_dirs)
    return create_app(
        backend,
        token,
        responses=backend.store,
        port_range=port_range,
        private_paths=(backend.home.root, *image_dirs),
    )


def _warn(message: str) -> None:
    print(f"boxvm: WARNING: {message}", file=sys.stderr, flush=True)


def serve(options: ServeOptions, announce: Callable[[str], None] = print) -> None:
    """Serve the local runtime's home until interrupted. Without a token only loopback
    addresses are allowed: anyone who reaches the port could otherwise run code."""
    host = options.host
    if options.no_token and options.token:
        raise InvalidArgument("--no-token and a token (--token or BOXVM_TOKEN) contradict each other: choose one")
    if options.no_token and not is_loopback(host):
        raise InvalidArgument(
            f"refusing to serve on {host} without a token: drop --no-token (a token is generated), or bind to 127.0.0.1"
        )
    if (options.tls_cert is None) != (options.tls_key is None):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    if options.tls_cert is not None:
        try:  # fail here with a clear message rather than inside uvicorn
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot load the TLS certificate and key: {exc}") from exc
    elif not is_loopback(host):
        _warn(
            f"serving on {host} WITHOUT TLS: the token, commands and files cross the network in clear text. "
            "Pass --tls-cert and --tls-key, or bind to 127.0.0.1 and tunnel."
        )
    import uvicorn

    from boxvm.backends.local import LocalBackend

    home = Home.default()
    token = None if options.no_token else options.token or ensure_token(home)
    if not options.no_token and not options.token:
        print(
            f"boxvm: the token is in {token_path(home)} (local clients with the same BOXVM_HOME read it by themselves)",
            file=sys.stderr,
            flush=True,
        )

    # Bound here (not by uvicorn) so that port 0 works and the real address is announced.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, options.port))
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {host}:{options.port}: {exc.strerror}") from exc
    bound = sock.getsockname()[1]
    # Listening from here on: a client that connects as soon as the address is announced
    # waits in the backlog until uvicorn accepts, instead of being refused.
    sock.listen(2048)
    scheme = "https" if options.tls_cert else "http"

    async def main() -> None:
        backend = LocalBackend(home)
        app = local_app(backend, token, options.image_dirs, options.port_range)
        config = uvicorn.Config(
            app,
            log_level="warning",
            ws="websockets-sansio",
            lifespan="off",
            timeout_keep_alive=SERVER_KEEPALIVE_SECS,
            ssl_certfile=options.tls_cert,
            ssl_keyfile=options.tls_key,
        )
        server = uvicorn.Server(config)
        announce(f"boxvm: serving {scheme}://{f'[{host}]' if ':' in host else host}:{bound}/v1")
        try:
            await server.serve(sockets=[sock])
        finally:
            await backend.close()

    asyncio.run(main())
