"""Running the REST server: socket, authentication policy, uvicorn."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable

from boxvm.errors import InvalidArgument
from boxvm.paths import Home


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(host: str, port: int, token: str | None, announce: Callable[[str], None] = print) -> None:
    """Serve the local runtime's home until interrupted. Without a token only loopback
    addresses are allowed: anyone who reaches the port could otherwise run code."""
    if not token and not is_loopback(host):
        raise InvalidArgument(
            f"refusing to serve on {host} without a token: pass --token (or set BOXVM_TOKEN), or bind to 127.0.0.1"
        )
    import uvicorn

    from boxvm.backends.local import LocalBackend
    from boxvm.server.app import create_app

    # Bound here (not by uvicorn) so that port 0 works and the real address is announced.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound = sock.getsockname()[1]

    async def main() -> None:
        backend = LocalBackend(Home.default())
        config = uvicorn.Config(
            create_app(backend, token or None), log_level="warning", ws="websockets-sansio", lifespan="off"
        )
        server = uvicorn.Server(config)
        announce(f"boxvm: serving http://{host}:{bound}/v1")
        try:
            await server.serve(sockets=[sock])
        finally:
            await backend.close()

    asyncio.run(main())
