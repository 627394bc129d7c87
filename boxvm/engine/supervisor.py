"""Per-box supervisor: QEMU's parent, sole owner of its QMP and agent channels.

A QEMU chardev takes one client, yet the library in any process, the CLI and the
server all need the box at once. The supervisor (started detached, so boxes outlive
whoever started them) multiplexes them all over ``ctl.sock``: it renumbers each client's
channels onto the one agent port (``agentlink``, which also polices the guest), answers
its own operations (``protocol.SUPERVISOR_OPS``: ``wait_ready``, ``stop``, ``capture``,
...), passes a client only the agent operations ``protocol.CLIENT_AGENT_OPS`` allows,
records status changes in the store the moment they happen, keeps QEMU's serial output in
a capped log (``console``), and removes the sockets when QEMU exits. It speaks to QEMU
only through the typed commands of ``qmp``.

Forked by the home's zygote (``engine/zygote``, no interpreter start-up per box), or run as
``python -m boxvm.engine.supervisor BOX_DIR``; ``BOX_DIR/vm.json`` says what to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, LIVE_DIR, PENDING, TOP, LayerStore, backing_of, beneath, layer_of
from boxvm.engine import confine, console, peers
from boxvm.engine.agentlink import AgentLink, Client
from boxvm.engine.memory_ops import MemoryOps
from boxvm.engine.qmp import QMP
from boxvm.errors import BoxvmError, EngineError, QuiesceError
from boxvm.guest import protocol as P
from boxvm.paths import Home
from boxvm.status import LIVE, BoxStatus
from boxvm.store import Store

log = logging.getLogger("boxvm.supervisor")
QEMU_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


class Supervisor(MemoryOps):
    def __init__(self, box_dir: Path) -> None:
        self.dir = box_dir
        cfg = json.loads((box_dir / "vm.json").read_text())
        self.box_id: str = cfg["box_id"]
        self.layers = LayerStore(Home(Path(cfg["home"])))
        self.top_node = "data"  # the running container disk's top block node
        self.unpublished: tuple[str, str | None] | None = None  # (layer, parent) switched to, not yet renamed
        self.node_serial = 0
        self.live: dict[str, Path] = {"data": self.layers.live_link(box_dir, 0)}  # node -> the link it opened
        self.capture_lock = asyncio.Lock()
        self.argv: list[str] = cfg["argv"]
        self.incoming = bool(cfg.get("incoming"))  # resume a saved memory state (engine/memory_ops)
        self.resume_plan: dict[str, Any] = cfg.get("resume") or {}  # how to resume it (engine/memory_ops)
        self.base_cached = False  # its private RAM's file read into the page cache (engine/memory_ops)
        self.start_token: float | None = cfg.get("start")  # the start that spawned it (state/starting)
        # QEMU runs confined (engine/confine): what it reads (kernel, initramfs) and writes (its RAM file)
        self.confine: dict[str, list[str]] | None = cfg.get("confine")
        self.store = Store(Path(cfg["db"]))
        self.link = AgentLink(self.on_hello, self.on_broken)
        self.ready = asyncio.get_running_loop().create_future()
        self.exited = asyncio.Event()
        self.stop_requested = False
        self.client_paused = False  # a client's pause: a memory save's end must not undo it
        self.qmp = QMP(f"boxvm-{self.box_id[:12]}")
        self.qemu: asyncio.subprocess.Process | None = None
        self.t0 = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []

    # -- start-up ---------------------------------------------------------------------
    async def run(self, notify_fd: int) -> None:
        # The box first (state/starting): a supervisor whose start was undone, or lost to
        # another start, touches nothing of it (links, sockets, QEMU and its disk lock).
        # A vm.json without its start's token (an older boxvm's, or a forged one) is refused:
        # only the start that wrote it may run.
        if self.start_token is None or not self.store.register_supervisor(
            self.box_id, self.start_token, os.getpid(), None
        ):
            log.error("box %s: its start was undone before this supervisor ran; exiting", self.box_id)
            os.close(notify_fd)  # the starter, if alive, sees a failed start
            return
        self.layers.clear_live_links(self.dir)  # a previous run's
        os.link(self.dir / TOP, self.live["data"])
        (self.dir / LIVE_DIR).mkdir(mode=0o700, exist_ok=True)  # later tops, saved devices (confined or not)
        failed, policy = None, None
        try:
            policy = self.policy()
            # QEMU's stdout is the serial console (-serial stdio), its stderr its own messages.
            self.qemu = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent if policy is None else functools.partial(_die_confined, policy),
                env=QEMU_ENV,  # not the caller's (which the zygote passed on): tokens and keys stay here
            )
        except (OSError, subprocess.SubprocessError, BoxvmError) as exc:
            failed = f"QEMU could not be started: {exc}"
        finally:
            if policy is not None:
                policy.close()
        server = await asyncio.start_unix_server(self.serve_client, path=str(self.dir / "ctl.sock"))
        os.chmod(self.dir / "ctl.sock", 0o600)
        qemu_pid = self.qemu.pid if self.qemu else None
        if not self.store.record_start_qemu(self.box_id, self.start_token, os.getpid(), qemu_pid):
            # A stop or remove --force took the box after this supervisor registered: it
            # killed with the pids it read then, so this VM must not outlive it.
            log.error("box %s: stopped while starting; its QEMU is killed", self.box_id)
            if self.qemu is not None and self.qemu.returncode is None:
                self.qemu.kill()
                await self.qemu.wait()
            server.close()
            os.close(notify_fd)  # the starter, if alive, sees a failed start
            return
        os.write(notify_fd, b"ok")
        os.close(notify_fd)
        if self.qemu is None:
            self.finish_failed(failed or "QEMU could not be started")
            return
        assert self.qemu.stdout is not None and self.qemu.stderr is not None
        limit = console.log_limit()
        for stream, name in ((self.qemu.stdout, "console.log"), (self.qemu.stderr, "qemu.log")):
            self.tasks.append(asyncio.create_task(console.pump(stream, console.RotatingLog(self.dir / name, limit))))
        watcher = asyncio.create_task(self.watch_qemu())
        try:
            await self.connect()
            if self.incoming:
                await self.resume_incoming()
        except Exception as exc:
            log.error("could not connect to QEMU: %s", exc)
            if self.qemu.returncode is None:
                self.qemu.kill()
        await watcher
        server.close()
        for name in ("ctl.sock", "qmp.sock", "agent.sock"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()

    def policy(self) -> confine.Policy | None:
        """The Landlock ruleset QEMU starts under (``engine/confine``), if it is to be
        confined: its two tops and its RAM file, ``live/`` (a later capture's tops are opened
        there), sockets in its box directory, and read-only its kernel, initramfs and each
        file beneath its tops (``chain_files``)."""
        if self.confine is None:
            return None
        reads = [Path(p) for p in self.confine["read"]] + self.chain_files()
        writes = [self.live["data"], self.dir / GUEST_TOP, *(Path(p) for p in self.confine["write"])]
        policy = confine.for_qemu(self.dir, reads, writes, self.argv[0])
        log.info("QEMU confined to its box (Landlock ABI %d)", policy.abi)
        return policy

    def chain_files(self) -> list[Path]:
        """The files beneath the box's two tops that its QEMU may read: the layers the store
        records for it and the image base the bottom one rests on, and the guest bundle's
        root file system. Not the files the tops' headers name, which QEMU writes: one it
        rewrote would name any file for this start to grant."""
        rec = self.store.get_box(self.box_id)
        if rec is None:
            raise EngineError("the box was removed")
        layers = self.store.layer_chain(rec.layer)
        below = self.layers.chain_of(self.dir / TOP, layers)[1:]  # its layers, then the base the bottom names
        home = self.layers.home
        named = [(base, home.images) for base in below[len(layers) :]]
        named.append((backing_of(self.dir / GUEST_TOP), home.guest))
        return below[: len(layers)] + [path for path, root in named if path is not None and beneath(path, root)]

    async def connect(self) -> None:
        # QEMU creates its sockets a moment after it starts: poll for them.
        deadline = time.monotonic() + 30
        while not (self.dir / "qmp.sock").exists() or not (self.dir / "agent.sock").exists():
            if time.monotonic() > deadline or self.exited.is_set():
                raise EngineError("QEMU did not create its sockets")
            await asyncio.sleep(0.01)
        await self.qmp.connect(self.dir / "qmp.sock")
        reader, writer = await asyncio.open_unix_connection(str(self.dir / "agent.sock"))
        self.tasks += [asyncio.create_task(self.drain_events()), *self.link.attach(reader, writer)]

    async def drain_events(self) -> None:
        # qemu.qmp queues every event for its default listener: consume them so a
        # long-lived supervisor does not grow without bound.
        async for event in self.qmp.events():
            log.debug("qmp event %s", event.get("event"))

    async def watch_qemu(self) -> None:
        assert self.qemu is not None
        code = await self.qemu.wait()
        # Record the outcome before anyone waiting on `exited` is told, so a caller of
        # stop() always reads the final status.
        if self.stop_requested:
            fields = {"supervisor_pid": None, "qemu_pid": None, "error": None}
            self.store.transition(self.box_id, self.final_status, LIVE, during_operation=True, **fields)
        else:
            self.finish_failed(self.exit_reason(code))
        self.layers.clear_live_links(self.dir)
        self.exited.set()
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(self.exit_reason(code)))
        self.link.fail("the VM exited")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

    def exit_reason(self, code: int) -> str:
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return f"QEMU exited unexpectedly ({how}); see `boxvm logs {self.box_id[:12]}`"

    def finish_failed(self, reason: str) -> None:
        self.store.transition(
            self.box_id, BoxStatus.FAILED, LIVE, during_operation=True, supervisor_pid=None, qemu_pid=None, error=reason
        )

    # -- agent side -------------------------------------------------------------------
    def on_hello(self, hello: dict[str, Any]) -> None:
        boot_ms = (time.monotonic() - self.t0) * 1000
        if self.ready.done():
            return
        uptime = _seconds(hello.get("uptime")) or 0.0
        self.store.transition(self.box_id, BoxStatus.RUNNING, {BoxStatus.STARTING}, started_at=time.time(), error=None)
        self.store.add_timing(self.box_id, boot_ms=boot_ms, guest_uptime_ms=uptime * 1000)
        self.ready.set_result(boot_ms)

    def on_broken(self, message: str) -> None:
        """The agent can no longer be talked to: the box keeps running (``stop`` works
        through QMP) but says why its agent calls fail."""
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(message))
        elif not self.exited.is_set():
            self.store.update_box(self.box_id, error=message)

    async def agent_request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await self.link.request(req, timeout)

    # -- client side ------------------------------------------------------------------
    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is None or not peers.trusted(sock):  # a box's QEMU: this box's guest is not its to run
            log.warning("refused a client on ctl.sock that is a QEMU (or not this user's)")
            writer.close()
            return
        client = Client(writer)
        decoder = P.Decoder()
        try:
            while data := await reader.read(1 << 20):
                for cid, ftype, payload in decoder.feed(data):
                    if ftype == P.OPEN:
                        self.open(client, cid, json.loads(payload), payload)
                    else:
                        self.link.from_client(client, cid, ftype, payload)
        except (ConnectionError, ValueError, AttributeError) as exc:
            log.debug("client dropped: %s", exc)
        except asyncio.CancelledError:  # the supervisor is shutting down
            pass
        finally:
            self.link.client_gone(client)
            writer.close()

    def open(self, client: Client, cid: int, req: dict[str, Any], payload: bytes) -> None:
        """A client's request: one of the supervisor's operations, or passed to the agent
        if clients may use it; anything else is refused here and never reaches the guest."""
        op = req.get("op")
        if isinstance(op, str) and op in P.CLIENT_AGENT_OPS:
            self.link.open(client, cid, req, payload)
        elif isinstance(op, str) and op in P.SUPERVISOR_OPS:
            task = asyncio.create_task(self.answer(client, cid, getattr(self, f"op_{op}"), req))
            self.tasks.append(task)
            task.add_done_callback(self.tasks.remove)
        else:
            refused = {"type": "InvalidArgument", "message": f"a box has no operation {op!r:.40} for clients"}
            client.send(P.pack_json(cid, P.RESULT, {"error": refused}))

    async def answer(self, client: Client, cid: int, handler: Any, req: dict[str, Any]) -> None:
        try:
            result = await handler(req)
        except BoxvmError as exc:
            log.info("%s failed: %s", req.get("op"), getattr(exc, "reply", None) or exc)
            result = {"error": {"type": exc.code, "message": exc.message}}
        except Exception as exc:
            log.exception("%s failed", req.get("op"))
            result = {"error": {"type": "EngineError", "message": f"{type(exc).__name__}: {exc}"}}
        with contextlib.suppress(ConnectionError):
            client.send(P.pack_json(cid, P.RESULT, result))

    async def op_wait_ready(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            boot_ms = await asyncio.wait_for(asyncio.shield(self.ready), req.get("timeout", 120))
        except TimeoutError:
            return {"error": {"type": "EngineError", "message": "the guest agent did not start in time"}}
        except RuntimeError as exc:
            return {"error": {"type": "EngineError", "message": str(exc)}}
        return {"ok": True, "boot_ms": boot_ms}

    async def op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        """Clean shutdown: the agent syncs and unmounts, then QEMU quits; force after timeout."""
        self.stop_requested = True
        timeout = float(req.get("timeout", 10))
        if self.unpublished is not None:  # none may outlive the VM
            async with self.capture_lock:
                with contextlib.suppress(Exception):
                    await self.settle()
        if self.ready.done() and not self.ready.exception() and not self.exited.is_set():
            with contextlib.suppress(Exception):
                await self.agent_request({"op": "shutdown"}, timeout)
        await self.quit()
        return {"ok": True}

    async def quit(self) -> None:
        """Ask QEMU to quit and wait until it has exited (and its status is recorded);
        kill it if it has not after 10 s."""
        if not self.exited.is_set():
            with contextlib.suppress(Exception):
                await self.qmp.quit()
        try:
            await asyncio.wait_for(self.exited.wait(), 10)
        except TimeoutError:
            if self.qemu is not None and self.qemu.returncode is None:
                self.qemu.kill()
            await self.exited.wait()

    async def op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        self.client_paused = True
        await self.qmp.stop()
        return {"ok": True}

    async def op_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.qmp.cont()
        self.client_paused = False
        return {"ok": True}

    # -- live capture -----------------------------------------------------------------
    async def op_capture(self, req: dict[str, Any]) -> dict[str, Any]:
        """Point-in-time capture of the running disk as a new layer; the VM never stops.

        The whole sequence runs here, under one lock, whatever becomes of the client:
        *prepare* a pending top over a new layer id and open it; *switch*: freeze the
        guest filesystem, one QMP transaction makes the pending top the disk's top (the
        old one is never written again), thaw; *publish*: the renames make the old top
        the layer and the pending top the box's top, and the store records it. Before
        the switch a failure drops the pending top (QEMU never wrote it); after it, the
        publish is retried by the next capture or stop (``settle``); if this process
        dies, so does QEMU, and the at-rest recovery rolls the pending top forward.
        The client records only what it adds (a snapshot name, a pin).
        """
        async with self.capture_lock:
            await self.settle()
            layer, parent = self.layers.prepare_capture(self.dir)
            try:
                result = await self.switch(req, (layer, parent))
            finally:
                await self.settle()  # the switch happened (even if the thaw then failed) or not
            return {"layer": layer, "parent": parent, **result}

    async def settle(self) -> None:
        """Publish and record the capture the disk was switched to; else drop a pending top,
        which QEMU never wrote (only this process writes one while the VM runs). With the lock."""
        if self.unpublished is None:
            (self.dir / PENDING).unlink(missing_ok=True)
            return
        await asyncio.to_thread(self.layers.commit, self.dir)
        layer, parent = self.unpublished
        self.unpublished = None
        self.store.record_capture(self.box_id, layer, parent)

    async def switch(self, req: dict[str, Any], capture: tuple[str, str | None]) -> dict[str, Any]:
        """Open the pending top, freeze, make it the disk's top, thaw; the timings."""
        timeout = float(req.get("quiesce_timeout", 30))
        quiesce = bool(req.get("quiesce", True)) and await self.qmp.status() == "running"
        self.node_serial += 1
        node = f"data-{self.node_serial}"
        link = self.layers.live_link(self.dir, self.node_serial)
        os.link(self.dir / PENDING, link)
        try:
            await self.qmp.blockdev_add_qcow2(node, link)
        except BaseException:
            link.unlink()
            raise
        consistency = "crash"
        t0 = time.monotonic()
        must_thaw = False
        frozen_at = 0.0
        try:
            if quiesce:
                try:
                    result = await self.agent_request({"op": "freeze"}, timeout)
                    must_thaw = "error" not in result  # never thaw a freeze that is not ours
                except TimeoutError:
                    must_thaw = True  # it may still complete in the guest
                    result = {"error": {"message": f"the guest did not freeze within {timeout:g} s"}}
                frozen_at = _seconds(result.get("started"))
                if "error" in result or frozen_at is None:
                    result.setdefault("error", {"message": "the guest agent sent a malformed freeze result"})
                    if req.get("stop_on_quiesce_fail", True):
                        try:
                            await self.qmp.blockdev_del(node)
                        finally:
                            link.unlink()
                        raise QuiesceError(f"{result['error']['message']}; the box was left untouched")
                else:
                    consistency = "frozen"
            t_switch = time.monotonic()
            await self.qmp.snapshot(self.top_node, node)
            captured, self.top_node = self.top_node, node
            self.live[node] = link
            self.unpublished = capture
            switch_ms = (time.monotonic() - t_switch) * 1000
        finally:
            thawed = await self.agent_request({"op": "thaw"}, 30) if must_thaw else {}
        window_ms = (time.monotonic() - t0) * 1000
        # frozen: measured by the guest; otherwise only QEMU's own I/O drain for the switch
        thawed_at = _seconds(thawed.get("at"))
        frozen = consistency == "frozen" and thawed_at is not None and frozen_at is not None
        pause_ms = (thawed_at - frozen_at) * 1000 if frozen else switch_ms  # type: ignore[operator]
        return {
            "consistency": consistency,
            "pause_ms": pause_ms,
            "switch_ms": switch_ms,
            "host_window_ms": window_ms,
            "node": captured,
        }

    async def op_release(self, req: dict[str, Any]) -> dict[str, Any]:
        """Fold a captured layer nobody keeps (an export's) back into the running top.

        A ``block-stream`` job copies the layer's own clusters up into the top and then
        points the top at the layer's backing, so the chain is as long as before the
        capture; the layer is then garbage-collected. The job walks the whole virtual
        disk (10 MiB per step), so it runs after this returns; the next capture waits
        for it. The top is consistent at every moment (its backing changes only once
        the copy is complete): a crash or stop mid-way only leaves the layer in place.
        """
        captured = req.get("node")
        await self.capture_lock.acquire()
        try:
            below = await self.qmp.backing_node(captured) if isinstance(captured, str) else None
            if captured not in self.live or below is None:
                raise EngineError(f"no captured layer {captured!r} to release")
            job = f"release-{captured}"
            backing = qcow2.read_header(self.live[captured]).backing_file
            await self.qmp.block_stream(job, self.top_node, below, backing)
        except BaseException:
            self.capture_lock.release()
            raise
        task = asyncio.create_task(self._finish_release(job, captured))
        self.tasks.append(task)
        task.add_done_callback(self.tasks.remove)
        return {"ok": True}

    async def _finish_release(self, job: str, captured: str) -> None:
        t0 = time.monotonic()
        try:
            while (state := await self.qmp.job(job)) is not None and state["status"] != "concluded":
                await asyncio.sleep(0.02)
            if state is not None:
                await self.qmp.job_dismiss(job)
            if state is None or "error" in state:
                log.warning("releasing %s failed, the layer stays: %s", captured, state)
                return
            self.live.pop(captured).unlink(missing_ok=True)
            folded = self.store.set_box_layer(self.box_id, layer_of(self.dir / TOP))  # back on the layer below
            await asyncio.to_thread(self.layers.collect, self.store, folded)
            self.store.add_timing(self.box_id, release_ms=(time.monotonic() - t0) * 1000)
        except Exception as exc:  # QEMU went away (a stop): the layer simply stays
            log.warning("releasing %s did not finish: %s", captured, exc)
        finally:
            self.capture_lock.release()


def _seconds(value: object) -> float | None:
    """A time the guest reported, if it is a plain finite non-negative number."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e12:
        return float(value)
    return None


def _die_with_parent() -> None:
    """QEMU gets SIGKILL if the supervisor dies, so no VM ever runs unsupervised."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _die_confined(policy: confine.Policy) -> None:
    _die_with_parent()
    policy.enter()


def serve(box_dir: Path, notify_fd: int) -> None:
    """Run ``box_dir``'s supervisor in this process, already detached; ``notify_fd`` gets
    ``ok`` once the control socket listens (by ``main`` or a zygote's fork, engine/zygote)."""
    logging.basicConfig(
        filename=box_dir / "supervisor.log",
        level=logging.DEBUG if os.environ.get("BOXVM_DEBUG") else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )

    async def run() -> None:
        await Supervisor(box_dir).run(notify_fd)

    asyncio.run(run())


def main() -> None:
    box_dir = Path(sys.argv[1])
    # Daemonize: the parent returns to the launcher once the control socket listens.
    notify_r, notify_w = os.pipe()
    if os.fork() > 0:
        os.close(notify_w)
        ok = os.read(notify_r, 2) == b"ok"
        os._exit(0 if ok else 1)
    os.close(notify_r)
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    serve(box_dir, notify_w)


if __name__ == "__main__":
    main()
