"""The supervisor's end of the guest agent's port: channel routing and distrust of the guest.

Every frame from the guest is hostile input. The link keeps, per channel, a ledger of the
flow-control window (output the guest sent minus the credit the host returned; input the
host sent minus the credit the guest returned), so a guest that ignores credits gets its
channel closed instead of making the host buffer: per channel the host holds at most one
window of output. HELLO and RESULT are parsed with a size cap and checked for shape before
anyone sees them; a bad one fails only its own request. A framing error (an oversized
length) leaves the rest of the stream meaningless, so it breaks the link: every pending
request fails and later ones fail at once, while the box stays up for ``stop`` (QMP).
Every request that waits on the guest has a deadline, except an exec without a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from boxvm.guest import protocol as P

log = logging.getLogger("boxvm.supervisor")

STREAMING_OPS = frozenset({"exec", "put", "get"})  # requests whose channel carries output
QUICK_TIMEOUT = 30.0  # a guest request other than exec/put/get (set_time, sync, ping, ...)
EXEC_GRACE = 10.0  # an exec with a timeout must report its end within the timeout plus this
IDLE_TIMEOUT = 120.0  # put/get: silence while the guest owes the host data or a result
MAX_JSON = 64 << 10  # a HELLO or RESULT payload
TICK = 0.5  # how often deadlines are checked
MAX_COMPLAINTS = 20  # protocol errors logged per link; a flood must not fill the log
GUEST_ERRORS = frozenset({"InvalidArgument", "NotFound", "QuiesceError", "EngineError"})


def error_result(message: str) -> dict[str, Any]:
    return {"error": {"type": "EngineError", "message": message}}


def parse_json(payload: bytes) -> dict[str, Any] | None:
    """A guest's JSON object, or None if it is too big, unreadable or not an object."""
    if len(payload) > MAX_JSON:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        return None
    return obj if isinstance(obj, dict) else None


def check_result(op: str, payload: bytes) -> dict[str, Any]:
    """The guest's RESULT in the shape host callers rely on, or an EngineError result."""
    obj = parse_json(payload)
    if obj is None:
        return error_result("the guest agent sent an unreadable result")
    if "error" in obj:
        err = obj["error"]
        if not (isinstance(err, dict) and isinstance(err.get("message"), str)):
            return error_result("the guest agent sent a malformed error")
        kind = err.get("type") if err.get("type") in GUEST_ERRORS else "EngineError"
        return {"error": {"type": kind, "message": err["message"]}}
    if op in ("exec", "put", "get"):
        code = obj.get("exit_code")
        if type(code) is not int or not 0 <= code <= 255:
            return error_result("the guest agent sent a result without a valid exit code")
        return {"exit_code": code, "timed_out": obj.get("timed_out") is True}
    if op == "clock" and type(obj.get("ns")) is not int:
        return error_result("the guest agent sent a clock reading that is not a whole number of nanoseconds")
    return obj


class Client:
    """One connection to ``ctl.sock`` and the channels it has open on the agent."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.routes: dict[int, Route] = {}

    def send(self, frame: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame)


@dataclass(eq=False)
class Route:
    """One agent channel: who gets its frames, its flow-control ledger and its deadline."""

    gid: int
    op: str
    target: Client | asyncio.Future[dict[str, Any]]
    cid: int
    deadline: float | None = None
    expired: str = ""  # the error when the deadline passes
    idle: bool = False  # put/get: watched for silence instead
    heard: float = field(default_factory=time.monotonic)
    unacked: int = 0  # output bytes the guest sent that the client has not credited
    stdin_unacked: int = 0  # input bytes sent to the guest that it has not credited
    eof: bool = False
    owed: int = 0  # guest credit not yet passed on (coalesced per read)


class AgentLink:
    def __init__(self, on_hello: Callable[[dict[str, Any]], None], on_broken: Callable[[str], None]) -> None:
        self.on_hello = on_hello
        self.on_broken = on_broken
        self.routes: dict[int, Route] = {}
        self.next_gid = 1
        self.writer: asyncio.StreamWriter | None = None
        self.failed: str | None = None  # set once: every request fails with this
        self.greeted = False
        self.complaints = 0
        self.owing: set[Route] = set()
        self._held: list[bytes] | None = None  # frames kept back while a capture reads guest RAM

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[asyncio.Task[None]]:
        self.writer = writer
        return [asyncio.create_task(self.read(reader)), asyncio.create_task(self.watch())]

    # -- host -> guest ----------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        if self._held is not None:
            self._held.append(frame)
        elif self.failed is None and self.writer is not None and not self.writer.is_closing():
            self.writer.write(frame)

    def hold(self) -> None:
        """Keep the agent's socket still, both ways, until :meth:`release`: frames to the
        guest are kept back in order, and the socket is not read. QEMU moves data between
        that socket and guest RAM even while the vCPUs are stopped (virtio-serial fills the
        guest's receive buffers, and a send throttled by a full socket resumes once it is
        read), so a capture that takes RAM and device state one after the other, not under
        QEMU's lock as a migration does, holds it across its pause. Not nested: callers
        hold the capture lock."""
        if self._held is None:
            self._held = []
            if self.writer is not None:
                self.writer.transport.pause_reading()

    def release(self) -> None:
        """Read the socket again and send what :meth:`hold` kept back."""
        held, self._held = self._held, None
        if held is None:
            return
        if self.writer is not None and not self.writer.is_closing():
            self.writer.transport.resume_reading()
        for frame in held:
            self._send(frame)

    def _add(self, target: Client | asyncio.Future[dict[str, Any]], cid: int, req: dict[str, Any]) -> Route:
        route = Route(self.next_gid, str(req.get("op"))[:40], target, cid)
        self.next_gid += 1
        timeout = req.get("timeout")
        if route.op == "exec":
            if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < math.inf:
                route.deadline = time.monotonic() + timeout + EXEC_GRACE
                route.expired = (
                    f"the guest agent did not report the end of the command within its {timeout:g} s timeout"
                    f" (+{EXEC_GRACE:g} s): the agent is unresponsive or a process that escaped the timeout"
                    " holds its output open"
                )
        elif route.op in ("put", "get"):
            route.idle = True
        elif isinstance(target, Client):  # the supervisor's own requests carry their own timeout
            route.deadline = time.monotonic() + QUICK_TIMEOUT
            route.expired = f"the guest agent did not answer {route.op!r} within {QUICK_TIMEOUT:g} s"
        self.routes[route.gid] = route
        return route

    def open(self, client: Client, cid: int, req: dict[str, Any], payload: bytes) -> None:
        """Route a client's OPEN to the agent (or fail it at once if the link is down)."""
        if self.failed is not None:
            client.send(P.pack_json(cid, P.RESULT, error_result(self.failed)))
            return
        if cid in client.routes:
            return  # the client reused a live channel id: ignore the second OPEN
        route = self._add(client, cid, req)
        client.routes[cid] = route
        self._send(P.HEADER.pack(len(payload), route.gid, P.OPEN) + payload)

    async def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The supervisor's own request; raises TimeoutError after ``timeout``."""
        if self.failed is not None:
            return error_result(self.failed)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        route = self._add(fut, 0, req)
        self._send(P.pack_json(route.gid, P.OPEN, req))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._forget(route)

    def from_client(self, client: Client, cid: int, ftype: int, payload: bytes) -> None:
        route = client.routes.get(cid)
        if route is None:
            return
        if ftype == P.CREDIT:
            if len(payload) == P.CREDIT_FMT.size:
                # Never more than the guest sent: its view of the window stays the host's.
                amount = min(P.unpack_credit(payload), route.unacked)
                route.unacked -= amount
                if amount:
                    route.heard = time.monotonic()  # the host took its time: the guest's silence counts from now
                    self._send(P.pack_credit(route.gid, amount))
            return
        if ftype == P.CLOSE:
            self._send(P.pack(route.gid, P.CLOSE))
            self._forget(route)
            return
        if ftype in (P.STDIN, P.EOF) and not route.stdin_unacked:
            route.heard = time.monotonic()  # new work for a guest that owed nothing: its silence counts from now
        if ftype == P.STDIN:
            route.stdin_unacked += len(payload)
            if route.stdin_unacked > P.WINDOW:
                self._close(route, "the client sent more input than the flow-control window allows")
                return
        elif ftype == P.EOF:
            route.eof = True
        elif ftype not in (P.SIGNAL, P.RESIZE):
            return
        self._send(P.HEADER.pack(len(payload), route.gid, ftype) + payload)

    def client_gone(self, client: Client) -> None:
        """Its channels are abandoned: the agent kills their processes."""
        for route in list(client.routes.values()):
            self._send(P.pack(route.gid, P.CLOSE))
            self._forget(route)

    # -- guest -> host ----------------------------------------------------------------
    async def read(self, reader: asyncio.StreamReader) -> None:
        decoder = P.Decoder()
        try:
            while data := await reader.read(1 << 20):
                try:
                    frames = decoder.feed(data)
                except ValueError as exc:  # a bad length: nothing after it can be framed
                    self._break(str(exc))
                    return
                for gid, ftype, payload in frames:
                    self._on_frame(gid, ftype, payload)
                self._pass_credit()
        except ConnectionError:
            pass
        except Exception:  # a bug here must fail the calls, not leave them waiting forever
            log.exception("reading the agent's port failed")
            self.fail("the supervisor lost the guest agent's connection (see supervisor.log)")
            return
        self.fail("the guest agent's port closed (the VM is stopping or has exited)")

    def _on_frame(self, gid: int, ftype: int, payload: bytes) -> None:
        if gid == 0:
            hello = parse_json(payload) if ftype == P.HELLO else None
            if hello is None:
                self.complain(f"ignored a bad frame of type {ftype} on channel 0")
            elif self.greeted:  # a restarted agent knows none of the open channels
                self.complain("the agent restarted")
                for route in list(self.routes.values()):
                    self._close(route, "the guest agent restarted while the request was running")
            else:
                self.greeted = True
                self.on_hello(hello)
            return
        route = self.routes.get(gid)
        if route is None:
            return  # a late frame of a finished or closed channel
        client = route.target if isinstance(route.target, Client) else None
        if ftype in (P.STDOUT, P.STDERR):
            if route.op not in STREAMING_OPS or (route.op == "put" and ftype == P.STDOUT):
                # output nobody reads would hold off the request's deadline (or a copy's timeout)
                self._close(route, f"it sent output for {route.op!r}, which has none", protocol=True)
                return
            if client is None or not payload:
                return
            route.heard = time.monotonic()  # progress only: empty frames would keep a stalled copy alive
            route.unacked += len(payload)
            if route.unacked > P.WINDOW:
                self._close(route, f"it sent more than the {P.WINDOW >> 10} KiB flow-control window", protocol=True)
                return
            client.send(P.HEADER.pack(len(payload), route.cid, ftype) + payload)
        elif ftype == P.CREDIT:
            amount = P.unpack_credit(payload) if len(payload) == P.CREDIT_FMT.size else -1
            if client is None or not 0 <= amount <= route.stdin_unacked:
                self._close(route, "it returned credit for input it never received", protocol=True)
                return
            if amount:
                route.heard = time.monotonic()
            route.stdin_unacked -= amount
            route.owed += amount
            self.owing.add(route)
        elif ftype == P.RESULT:
            self._forget(route)
            self._deliver(route, check_result(route.op, payload))
        else:
            self.complain(f"ignored a frame of unknown type {ftype}")

    def _pass_credit(self) -> None:
        """One CREDIT per channel per read, however many the guest split it into."""
        for route in self.owing:
            if route.owed and isinstance(route.target, Client):
                route.target.send(P.pack_credit(route.cid, route.owed))
            route.owed = 0
        self.owing.clear()

    # -- ending channels --------------------------------------------------------------
    def _forget(self, route: Route) -> None:
        self.routes.pop(route.gid, None)
        self.owing.discard(route)
        if isinstance(route.target, Client) and route.target.routes.get(route.cid) is route:
            del route.target.routes[route.cid]

    def _deliver(self, route: Route, result: dict[str, Any]) -> None:
        if isinstance(route.target, Client):
            route.target.send(P.pack_json(route.cid, P.RESULT, result))
        elif not route.target.done():
            route.target.set_result(result)

    def _close(self, route: Route, reason: str, protocol: bool = False) -> None:
        """End one channel: the agent kills its process, the caller gets an EngineError."""
        if protocol:
            reason = f"the guest agent broke the protocol: {reason}; the channel was closed"
        self.complain(reason)
        self._send(P.pack(route.gid, P.CLOSE))
        self._forget(route)
        self._deliver(route, error_result(reason))

    def _break(self, reason: str) -> None:
        message = (
            f"the guest agent broke the protocol ({reason}); its connection was dropped:"
            " stop and start the box to use it again"
        )
        log.error("%s", message)
        self.fail(message)
        self.on_broken(message)

    def fail(self, message: str) -> None:
        """Fail every pending request, and every later one at once, with ``message``."""
        if self.failed is not None:
            return
        self.failed = message
        routes = list(self.routes.values())
        self.routes.clear()
        self.owing.clear()
        for route in routes:
            if isinstance(route.target, Client):
                route.target.routes.pop(route.cid, None)
            self._deliver(route, error_result(message))
        if self.writer is not None:
            self.writer.close()

    async def watch(self) -> None:
        """Expire requests the guest does not answer in time. A channel whose output the
        host has not consumed yet is never expired: the wait may be the host's."""
        while self.failed is None:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for route in list(self.routes.values()):
                if route.unacked:
                    continue
                if route.deadline is not None and now > route.deadline:
                    self._close(route, route.expired)
                elif route.idle and (route.stdin_unacked or route.eof) and now - route.heard > IDLE_TIMEOUT:
                    self._close(route, f"the guest agent stalled for {IDLE_TIMEOUT:g} s during {route.op!r}")

    def complain(self, message: str) -> None:
        self.complaints += 1
        if self.complaints <= MAX_COMPLAINTS:
            log.warning("guest agent: %s", message)
        elif self.complaints == MAX_COMPLAINTS + 1:
            log.warning("guest agent: further protocol errors are not logged")
