"""An attacker's HTTP(S) server for the tests (stdlib ``http.server`` on 127.0.0.1): a
``route`` answers each request as an attacker would, and every request is recorded. Written by
hand on purpose: a hostile peer must be free to lie in ways no real server library allows."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

Handler = http.server.BaseHTTPRequestHandler
Route = Callable[["Fake", Handler], None]


@dataclass
class Fake:
    """An attacker's HTTP(S) server: ``route`` answers; every request is recorded."""

    route: Route
    bind: str = "127.0.0.1"
    tls: ssl.SSLContext | None = None
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"{self.bind}:{self.server.server_address[1]}"

    def authorizations(self) -> list[str]:
        return [auth for _, auth in self.seen if auth]

    def start(self) -> Fake:
        fake = self

        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.seen.append((self.path, self.headers.get("Authorization")))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    fake.route(fake, self)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_GET  # the route reads the method

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((self.bind, 0), Answer)
        self.server.daemon_threads, self.server.block_on_close = True, False
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@contextlib.contextmanager
def fakes(*routes: Route, bind: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[list[Fake]]:
    started = [Fake(r, bind, tls).start() for r in routes]
    try:
        yield started
    finally:
        for f in started:
            f.stop()


def reply(h: Handler, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)
