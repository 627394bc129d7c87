"""The local backend: boxes on this host, under the runtime home.

Metadata lives in the store; each running box has a detached supervisor (see
``engine/supervisor.py``). This process keeps no state a second process would need:
it reads the store, checks that the supervisor it names is really alive, and talks
to it over the box's control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

from boxvm import faults, publish
from boxvm.backends import memory as box_memory
from boxvm.backends.base import Backend, ProcessChannel
from boxvm.backends.state import OWNER, StateOps, mark_owner
from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP, LayerStore
from boxvm.engine import accel as accel_mod
from boxvm.engine import console, hostclock, memory, qemu
from boxvm.engine.client import Channel, Connection
from boxvm.errors import AlreadyExists, BoxNotFound, EngineError, InvalidArgument, InvalidState, NotFound, StorageError
from boxvm.guest import bundle as bundle_mod
from boxvm.images import ImageStore
from boxvm.options import BoxInfo, BoxOptions, ImageInfo, check_name, default_command
from boxvm.paths import Home
from boxvm.processes import alive as _pid_alive
from boxvm.progress import Progress, silent
from boxvm.status import LIVE, RULES, BoxStatus, Operation, require
from boxvm.store import BoxRecord, ImageRecord, Store
from boxvm.streams import ByteStream

log = logging.getLogger("boxvm")
ProcessChannel.register(Channel)

READY_TIMEOUT = 180.0  # TCG boots in seconds, but a loaded CI machine can be slow


class LocalBackend(StateOps, box_memory.SuspendOps, Backend):
    def __init__(self, home: Home, progress: Progress = silent) -> None:
        self.home = home
        home.ensure()
        self.store = Store(home.db)
        self.images = ImageStore(home, self.store)
        self.layers = LayerStore(home)
        self.progress = progress
        self.journal_dir = home.tmp
        self._conns: dict[str, Connection] = {}
        self._accel: accel_mod.Accel | None = None
        self.recover()

    # -- recovery ---------------------------------------------------------------------
    def recover(self) -> None:
        """Remove what crashed operations left: staging dirs of dead processes, box
        directories with no record (a create that never committed)."""
        publish.recover(self.home.tmp, _pid_alive)  # before the loop below deletes its journal
        self.layers.recover_trash(self.store, _pid_alive)  # (likewise)
        for entry in self.home.tmp.iterdir():
            pid = entry.name.split("-")[-2] if entry.name.count("-") >= 2 else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        records = self.store.list_boxes()
        known = {rec.id for rec in records}
        for entry in self.home.boxes.iterdir():
            if _owner_alive(entry):
                continue  # another process is about to commit this box
            # (``known`` may predate a box another process committed, then un-owned, since)
            if entry.name not in known and self.store.get_box(entry.name) is None:
                log.info("removing orphaned box directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            else:
                (entry / OWNER).unlink(missing_ok=True)
        for rec in records:
            self._finish_crashed_operation(rec)
        self._gc()
        self.layers.trash.flush()

    def _finish_crashed_operation(self, rec: BoxRecord) -> BoxRecord:
        """A state operation whose process died: release the box and, if it is at rest,
        roll its disk change forward (always data-safe: a pending top is empty or holds
        the newest writes). A running box's supervisor settles its own pending top."""
        if rec.operation is None or (rec.operation_pid is not None and _pid_alive(rec.operation_pid)):
            return rec
        if not self.store.take_over_operation(rec.id, rec.operation_pid, os.getpid()):
            return self.store.get_box(rec.id) or rec  # another process is finishing it
        log.warning("finishing the interrupted %s of box %s", rec.operation.value, rec.name)
        if not (rec.status.is_live and rec.supervisor_pid and _pid_is(rec.supervisor_pid, rec.id)):
            self.layers.commit(self.home.box_dir(rec.id))
        self._sync_layer(rec.id)
        self.store.end_operation(rec.id)
        return self.store.get_box(rec.id) or rec

    # -- records ----------------------------------------------------------------------
    def _record(self, id_or_name: str) -> BoxRecord:
        rec = self.store.get_box(id_or_name)
        if rec is None:
            raise BoxNotFound(f"no box named or with id {id_or_name!r}: `boxvm ls` lists them")
        return self._reconcile(rec)

    def _reconcile(self, rec: BoxRecord) -> BoxRecord:
        """A box whose supervisor is gone is not running, whatever the store says."""
        rec = self._finish_crashed_operation(rec)
        if not rec.status.is_live:
            return rec
        alive = rec.supervisor_pid is not None and _pid_is(rec.supervisor_pid, rec.id)
        if alive or (rec.supervisor_pid is None and rec.status == BoxStatus.STARTING and _recent(rec)):
            return rec
        if rec.qemu_pid is not None and _pid_is(rec.qemu_pid, rec.id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.qemu_pid, signal.SIGKILL)
        reason = rec.error or "the box's supervisor process died; its VM was stopped"
        self.store.transition(
            rec.id, BoxStatus.FAILED, {rec.status}, during_operation=True, supervisor_pid=None, qemu_pid=None,
            error=reason,
        )  # fmt: skip
        for name in ("ctl.sock", "qmp.sock", "agent.sock"):
            (self.home.box_dir(rec.id) / name).unlink(missing_ok=True)
        return self.store.get_box(rec.id) or rec

    def _info(self, rec: BoxRecord) -> BoxInfo:
        opts = BoxOptions.from_dict(rec.options)
        disk = self.home.box_dir(rec.id) / TOP
        try:
            depth = len(qcow2.chain(disk))
        except (OSError, StorageError):
            depth = 0
        return BoxInfo(
            id=rec.id,
            name=rec.name,
            status=rec.shown_status,
            image=rec.image,
            created_at=rec.created_at,
            started_at=rec.started_at,
            cpus=opts.cpus,
            memory_mib=opts.memory_mib,
            disk_size_bytes=opts.disk_size_gb << 30,
            disk_bytes=qcow2.allocated_bytes(disk),
            chain_depth=depth,
            ports=list(opts.ports),
            guest_bundle=rec.guest_bundle,
            error=rec.error,
            timings=dict(rec.timings),
            command=default_command(opts, rec.options.get("image_config") or {}),
        )

    # -- lifecycle --------------------------------------------------------------------
    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo:
        t0 = time.monotonic()
        options.validate()
        box_id = secrets.token_hex(16)
        name = check_name(name) if name is not None else f"box-{box_id[:8]}"
        if self.store.get_box(name) is not None:
            raise AlreadyExists(f"a box named {name!r} already exists: choose another name or remove it")
        image = await asyncio.to_thread(self.images.resolve, options.image, self.progress)
        base = await asyncio.to_thread(self.images.base_disk, image, options.disk_size_gb, self.progress)
        bundle = await asyncio.to_thread(self._bundle)
        final = self.home.box_dir(box_id)
        with self.home.staging("box-") as work:
            # tmp/ and boxes/ sit at the same depth, so relative backing paths written
            # here stay valid after the rename (and when the whole home is moved).
            qcow2.write_overlay(work / TOP, qcow2.read_header(base).size, os.path.relpath(base, final))
            rootfs = bundle.rootfs
            qcow2.write_overlay(work / GUEST_TOP, rootfs.stat().st_size, os.path.relpath(rootfs, final), "raw")
            work.chmod(0o700)
            mark_owner(work)
            self.layers.publish(work, final)
        rec = BoxRecord(
            id=box_id,
            name=name,
            status=BoxStatus.CONFIGURED,
            image=image.reference,
            image_digest=image.digest,
            options={**options.to_dict(), "image_config": image.runtime_config},
            mac=qemu.new_mac(),
            guest_bundle=bundle.id,
            timings={"create_ms": round((time.monotonic() - t0) * 1000, 2)},
        )
        faults.point("create:renamed")
        try:
            self.store.insert_box(rec)  # the commit point: before it, recovery removes the dir
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        (final / OWNER).unlink(missing_ok=True)
        return self._info(rec)

    def _bundle(self) -> bundle_mod.Bundle:
        found = bundle_mod.find(self.home)
        return found if found is not None else bundle_mod.ensure(self.home, self.progress)

    async def get(self, id_or_name: str) -> BoxInfo | None:
        rec = self.store.get_box(id_or_name)
        return self._listed(self._reconcile(rec)) if rec else None

    async def list(self) -> list[BoxInfo]:
        return [self._listed(self._reconcile(rec)) for rec in self.store.list_boxes()]

    def _listed(self, rec: BoxRecord) -> BoxInfo:
        """A box as listed (and got): one whose record cannot be shown is listed as failed,
        with the reason, rather than making the list of every box fail (it can be removed)."""
        try:
            return self._info(rec)
        except Exception as exc:  # any defect of one stored record
            log.warning("box %s has an unreadable record: %r", rec.id, exc)
            return BoxInfo(
                id=rec.id, name=rec.name, status=BoxStatus.FAILED, image=str(rec.image), created_at=rec.created_at,
                started_at=None, cpus=0, memory_mib=0, disk_size_bytes=0, disk_bytes=0, chain_depth=0, ports=[],
                guest_bundle=None, error="the box's stored options are unreadable: remove the box", timings={},
                command=[],
            )  # fmt: skip

    async def remove(self, box_id: str, force: bool) -> None:
        rec = self._record(box_id)
        allowed = RULES[Operation.REMOVE].allowed
        # A box at rest whose files agree with its record goes in one transaction, which
        # checks that nothing holds it. Otherwise it is claimed like a state operation, so
        # none (nor a start or stop) runs on a box whose row and files are going away; a
        # second remover gets InvalidState/NotFound.
        quiet = self.layers.quiet_top(self.home.box_dir(rec.id)) if rec.status in allowed else None
        dead = self.store.remove_box(rec.id, (allowed, quiet[1])) if quiet is not None else None
        if dead is None:
            async with self._claim(rec, Operation.FORCE_REMOVE if force else Operation.REMOVE) as c:
                rec = self._record(rec.id)
                if rec.status.is_live:
                    await self._kill(rec)
                await self._drop_conn(rec.id)
                self._sync_layer(rec.id)  # a capture left unrecorded by a crash is released too
                dead = self.store.remove_box(rec.id) or []  # the name and its references go at once; files follow
                c.ended = True  # (with the row)
        await self._drop_conn(rec.id)
        faults.point("remove:row-deleted")
        self.layers.trash.discard([(self.home.box_dir(rec.id), f"B-{rec.id}")], durable=self.store.sync)
        self.layers.collect(self.store, dead)  # layers only this box (and its snapshots) held

    async def _kill(self, rec: BoxRecord) -> None:
        """Force a running box down (remove --force, a failed start or stop). If it is no
        longer live, whoever moved it on owns it; the pids are checked before any kill."""
        self.store.transition(rec.id, BoxStatus.STOPPING, LIVE, during_operation=True)
        for pid in (rec.qemu_pid, rec.supervisor_pid):
            if pid is not None and _pid_is(pid, rec.id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            p is not None and _pid_is(p, rec.id) for p in (rec.qemu_pid, rec.supervisor_pid)
        ):
            await asyncio.sleep(0.02)

    def _accel_choice(self) -> accel_mod.Accel:
        if self._accel is None:
            self._accel = accel_mod.detect()
            if self._accel.name == "tcg":
                log.warning("boxvm: %s", self._accel.reason)
        return self._accel

    async def start(self, box_id: str) -> BoxInfo:
        t0 = time.monotonic()
        rec = self._record(box_id)
        rule = require(Operation.START, rec.name, rec.status, rec.operation)
        resume = box_memory.resumable(self.store, self.home.box_dir(rec.id), rec)
        # Boot the bundle the box was made with; if it was garbage-collected, the newest.
        bundle = bundle_mod.find(self.home, rec.guest_bundle)
        if bundle is None:
            raise EngineError("the guest bundle is missing: run `boxvm setup`")
        if bundle.id != rec.guest_bundle:
            self.store.update_box(rec.id, guest_bundle=bundle.id)
        if not self.store.transition(
            rec.id, rule.holds, {rec.status}, supervisor_pid=None, qemu_pid=None, error=None,
            started_at=time.time(),
        ):  # fmt: skip
            raise InvalidState(f"box {rec.name!r} changed status while starting: try again")
        box_dir = self.home.box_dir(rec.id)
        await asyncio.to_thread(self.layers.commit, box_dir)  # a top left pending by a crash
        if not resume:  # a cold boot starts from fresh, empty RAM
            await asyncio.to_thread(memory.fresh_ram, box_dir, BoxOptions.from_dict(rec.options).memory_mib)
        opts = BoxOptions.from_dict(rec.options)
        accel = self._accel_choice()
        spec = qemu.VmSpec(
            box_dir=box_dir,
            kernel=bundle.kernel,
            initramfs=bundle.initramfs,
            disk=self.layers.live_link(box_dir, 0),  # the supervisor links it to the top
            guest_disk=box_dir / "guest-rootfs.qcow2",
            cpus=opts.cpus,
            memory_mib=opts.memory_mib,
            network=opts.network,
            ports=opts.ports,
            mac=rec.mac,
            hostname=rec.name,
            machine_id=rec.id,
            memory_file=box_dir / memory.RAM,
            incoming=resume,
            tsc_khz=await asyncio.to_thread(hostclock.tsc_khz, self.home.cache) if accel.name == "tcg" else None,
        )
        try:
            argv = qemu.argv(spec, accel)
            for name in ("ctl.sock", "qmp.sock", "agent.sock", "console.log"):
                (box_dir / name).unlink(missing_ok=True)
            (box_dir / "vm.json").write_text(
                json.dumps(
                    {"box_id": rec.id, "argv": argv, "db": str(self.home.db), "home": str(self.home.root)}
                    | {"incoming": resume}
                )
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "boxvm.engine.supervisor", str(box_dir),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            if await proc.wait() != 0:
                raise EngineError(f"the supervisor of box {rec.name!r} failed to start; see {box_dir}/supervisor.log")
            conn = await self._conn(rec.id, rec.name)
            await conn.request("wait_ready", timeout=READY_TIMEOUT)
            await _set_guest_time(conn, rec.name)
        except BaseException as exc:
            await self._abort_start(rec, exc)
            if isinstance(exc, Exception) and self.store.get_box(rec.id) is None:
                raise NotFound(f"box {rec.name!r} was removed while it was starting") from exc
            raise
        self.store.add_timing(rec.id, start_ms=(time.monotonic() - t0) * 1000)
        return self._info(self._record(rec.id))

    async def _abort_start(self, rec: BoxRecord, exc: BaseException) -> None:
        fresh = self.store.get_box(rec.id) or rec
        await self._kill(fresh)
        await self._drop_conn(rec.id)
        tail = _tail(self.home.box_dir(rec.id) / "console.log")
        message = f"box {rec.name!r} failed to start: {exc}" + (f"\nconsole:\n{tail}" if tail else "")
        # FAILED -> FAILED too: the supervisor may have recorded QEMU's exit first; keep the
        # console tail. A box stopped (or started again) meanwhile is left as it is.
        self.store.transition(
            rec.id, BoxStatus.FAILED, {BoxStatus.STOPPING, BoxStatus.FAILED}, during_operation=True,
            supervisor_pid=None, qemu_pid=None, error=message,
        )  # fmt: skip
        if isinstance(exc, EngineError):
            exc.message = message
            exc.args = (message,)

    async def stop(self, box_id: str, timeout: float) -> BoxInfo:
        t0 = time.monotonic()
        rec = self._record(box_id)
        rule = require(Operation.STOP, rec.name, rec.status, rec.operation)
        if not self.store.transition(rec.id, rule.holds, {rec.status}):
            raise InvalidState(f"box {rec.name!r} changed status while stopping: try again")
        try:
            conn = await self._conn(rec.id, rec.name)
            await conn.request("stop", timeout=timeout)
        except EngineError:
            await self._kill(rec)
            self.store.transition(
                rec.id, BoxStatus.STOPPED, {BoxStatus.STOPPING}, during_operation=True, supervisor_pid=None,
                qemu_pid=None,
            )  # fmt: skip
        await self._drop_conn(rec.id)
        deadline = time.monotonic() + 10  # the supervisor exits right after QEMU
        while rec.supervisor_pid and _pid_is(rec.supervisor_pid, rec.id) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.store.add_timing(rec.id, stop_ms=(time.monotonic() - t0) * 1000)
        return self._info(self._record(rec.id))

    async def _qmp_toggle(self, box_id: str, op: Operation, command: str, undo: str, to: BoxStatus) -> BoxInfo:
        rec = self._record(box_id)
        require(op, rec.name, rec.status, rec.operation)
        conn = await self._conn(rec.id, rec.name)
        await conn.request(command)
        if not self.store.transition(rec.id, to, {rec.status}):
            now = self._record(rec.id)
            if now.status != to:  # (the same toggle by another caller is a success)
                if now.status == rec.status:  # a state operation claimed it meanwhile: undo ours
                    await conn.request(undo)
                raise InvalidState(
                    f"cannot {op} box {rec.name!r}: it became {now.shown_status.value} meanwhile; try again"
                )
        return self._info(self._record(rec.id))

    async def pause(self, box_id: str) -> BoxInfo:
        return await self._qmp_toggle(box_id, Operation.PAUSE, "pause", "resume", BoxStatus.PAUSED)

    async def resume(self, box_id: str) -> BoxInfo:
        return await self._qmp_toggle(box_id, Operation.RESUME, "resume", "pause", BoxStatus.RUNNING)

    # -- inside the box ---------------------------------------------------------------
    async def _conn(self, box_id: str, label: str) -> Connection:
        conn = self._conns.get(box_id)
        if conn is None or conn.closed:
            conn = await Connection.open(self.home.box_dir(box_id) / "ctl.sock", label)
            self._conns[box_id] = conn
        return conn

    async def _drop_conn(self, box_id: str) -> None:
        conn = self._conns.pop(box_id, None)
        if conn is not None:
            await conn.close()

    async def _running(self, box_id: str, op: Operation) -> tuple[BoxRecord, Connection]:
        rec = self._record(box_id)
        require(op, rec.name, rec.status, rec.operation)
        return rec, await self._conn(rec.id, rec.name)

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
        if isinstance(argv, str | bytes) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidArgument("argv must be a non-empty list of strings, e.g. ['sh', '-c', 'echo hi']")
        if any("\0" in a for a in argv):
            raise InvalidArgument("argv must not contain NUL bytes")
        if timeout is not None and timeout <= 0:
            raise InvalidArgument(f"timeout must be positive, not {timeout}")
        rec, conn = await self._running(box_id, Operation.EXEC)
        opts = rec.options
        image_cfg = opts.get("image_config") or {}
        merged: dict[str, str] = {}
        for item in image_cfg.get("Env") or []:
            key, _, value = item.partition("=")
            merged[key] = value
        merged.update(opts.get("env") or {})
        merged.update(env or {})
        for key, value in merged.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidArgument(f"bad environment variable {key!r}")
        request = {
            "op": "exec",
            "argv": list(argv),
            "env": merged,
            "cwd": cwd or opts.get("workdir") or image_cfg.get("WorkingDir") or "/",
            "user": user or opts.get("user") or image_cfg.get("User") or "root",
            "timeout": timeout,
            "tty": tty,
        }
        if size is not None:
            request["rows"], request["cols"] = size
        return conn.open_channel(request)

    async def put_files(self, box_id: str, box_path: str, tar: AsyncIterator[bytes]) -> None:
        if not box_path.startswith("/"):
            raise InvalidArgument(f"box path {box_path!r} must be absolute")
        _rec, conn = await self._running(box_id, Operation.COPY)
        chan = conn.open_channel({"op": "put", "path": box_path})
        try:
            async for chunk in tar:
                await chan.write(chunk)
        except BaseException:
            chan.signal(signal.SIGKILL)  # an input cut off mid-stream must not half-apply quietly
            raise
        chan.close_stdin()
        stderr = await chan.stderr.read()
        result = await chan.wait()
        if result.get("exit_code"):
            raise NotFound(f"cannot copy into {box_path}: {stderr.decode().strip()}")

    async def get_files(self, box_id: str, box_path: str) -> ByteStream:
        if not box_path.startswith("/"):
            raise InvalidArgument(f"box path {box_path!r} must be absolute")
        _rec, conn = await self._running(box_id, Operation.COPY)
        chan = conn.open_channel({"op": "get", "path": box_path})
        chan.close_stdin()
        chunks = aiter(chan.stdout)
        first = await anext(chunks, b"")

        async def fail() -> NoReturn:
            stderr = await chan.stderr.read()
            result = await chan.wait()
            if result.get("exit_code"):
                raise NotFound(f"cannot copy {box_path} out of the box: {stderr.decode().strip()}")
            raise EngineError(f"the box sent no data for {box_path}")

        if not first:
            await fail()

        async def rest() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk
            if (await chan.wait()).get("exit_code"):
                await fail()

        async def release() -> None:
            chan.signal(signal.SIGKILL)  # if the reader stopped early, end the guest's tar (else a no-op)

        return ByteStream(rest(), release)

    # -- images -----------------------------------------------------------------------
    async def image_pull(self, reference: str, username: str | None, password: str | None, insecure: bool) -> ImageInfo:
        from boxvm.images.registry import Credentials

        creds = Credentials(username, password or "") if username else None
        image = await asyncio.to_thread(self.images.resolve, reference, self.progress, creds, insecure)
        return self._image_info(self.images.find(image.digest))

    async def image_list(self) -> list[ImageInfo]:
        return [self._image_info(r) for r in self.store.list_images()]

    def _image_info(self, rec: ImageRecord) -> ImageInfo:
        names = sorted(ref for ref, digest in self.store.image_refs().items() if digest == rec.digest)
        return ImageInfo(rec.reference, rec.digest, rec.size_bytes, rec.created_at, names)

    async def image_remove(self, reference: str) -> None:
        digest = self.images.find(reference).digest
        users = [b.name for b in self.store.list_boxes() if b.image_digest == digest]
        await asyncio.to_thread(self.images.remove, reference, users)

    async def logs(self, box_id: str) -> str:
        rec = self._record(box_id)
        return console.tail(self.home.box_dir(rec.id) / "console.log")  # bounded: the guest wrote it

    async def close(self) -> None:
        for box_id in list(self._conns):
            await self._drop_conn(box_id)
        await asyncio.to_thread(self.layers.trash.flush)
        self.store.close()


async def _set_guest_time(conn: Connection, label: str, probes: int = 3) -> None:
    """Step the guest's wall clock to the host's (its RTC has whole seconds only, and it
    has no NTP). As NTP does: the guest's offset is its reading minus the midpoint of the
    host's clock around the tightest of a few round trips, so the error is at most half
    that round trip, however slow one way is. An agent from an older bundle lacks the
    request: warn only."""
    try:
        best: tuple[int, int] | None = None  # (round trip, offset) in ns
        for _ in range(probes):
            t0 = time.time_ns()
            guest = int((await conn.request("clock"))["ns"])
            t1 = time.time_ns()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, guest - (t0 + t1) // 2)
        assert best is not None
        await conn.request("clock", step_ns=-best[1])
    except InvalidArgument as exc:
        log.warning("box %s keeps its own clock: %s", label, exc)


def _owner_alive(directory: Path) -> bool:
    try:
        pid = int((directory / OWNER).read_text())
    except (OSError, ValueError):
        return False
    return _pid_alive(pid)


def _pid_is(pid: int, box_id: str) -> bool:
    """True if ``pid`` lives and belongs to this box (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return box_id.encode() in cmdline and state != "Z"


def _recent(rec: BoxRecord) -> bool:
    return rec.started_at is not None and time.time() - rec.started_at < 60


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
