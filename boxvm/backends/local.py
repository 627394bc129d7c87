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
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NoReturn

from boxvm import faults, templates
from boxvm.backends.base import Backend, ProcessChannel
from boxvm.disks.layers import LayerStore, Scan
from boxvm.engine import accel as accel_mod
from boxvm.engine import console, hostclock, memory, qemu, qemucaps, zygote
from boxvm.engine.client import Channel, Connection
from boxvm.errors import BoxNotFound, EngineError, InvalidArgument, InvalidState, NotFound, printable
from boxvm.guest import bundle as bundle_mod
from boxvm.images import ImageStore
from boxvm.options import (
    BoxInfo,
    BoxOptions,
    CloneOptions,
    DiskUsage,
    ExportOptions,
    ImageInfo,
    SnapshotInfo,
    SnapshotOptions,
    check_lease_holder,
    check_presented_holder,
)
from boxvm.paths import Home
from boxvm.progress import Progress, silent
from boxvm.state import starting
from boxvm.state.boxes import Boxes, pid_is
from boxvm.state.clones import Clones
from boxvm.state.context import Context
from boxvm.state.memory import Suspend, resumable, resume_plan
from boxvm.state.snapshots import Snapshots
from boxvm.state.transfer import Transfer
from boxvm.status import BoxStatus, Operation, require
from boxvm.store import BoxRecord, ImageRecord, Store
from boxvm.streams import ByteStream

log = logging.getLogger("boxvm")
ProcessChannel.register(Channel)

READY_TIMEOUT = 180.0  # TCG boots in seconds, but a loaded CI machine can be slow


class LocalBackend(templates.TemplateOps, Backend):
    """The facade: lifecycle, exec and files here; records, snapshots, clones, transfer and
    suspend are the state services' (``boxvm/state/``)."""

    def __init__(self, home: Home, progress: Progress = silent) -> None:
        self.home = home
        home.ensure()
        self.store = Store(home.db)
        self.images = ImageStore(home, self.store)
        self.layers = LayerStore(home)
        self.progress = progress
        self.journal_dir = home.tmp
        self.state = Context(home, self.store, self.images, self.layers, progress)
        self.boxes = Boxes(self.state)
        self.snapshots = Snapshots(self.boxes)
        self.clones = Clones(self.snapshots)
        self.transfer = Transfer(self.snapshots)
        self.memory = Suspend(self.boxes)
        self._accel: accel_mod.Accel | None = None
        self._unsandboxed_said = False
        self._unconfined_said = False
        self.boxes.recover()

    # -- records ----------------------------------------------------------------------
    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo:
        return await self.boxes.create(options, name)

    async def get(self, id_or_name: str) -> BoxInfo | None:
        rec = self.store.get_box(id_or_name)
        return self.boxes.listed(self.boxes.reconcile(rec)) if rec else None

    async def list(self) -> list[BoxInfo]:
        return [self.boxes.listed(self.boxes.reconcile(rec)) for rec in self.store.list_boxes()]

    async def remove(self, box_id: str, force: bool, holder: str | None = None) -> None:
        await self.boxes.remove(box_id, force, check_presented_holder(holder))

    def check_layers(self, repair: bool = False) -> Scan:
        return self.boxes.check_layers(repair)

    async def disk_usage(self) -> DiskUsage:
        return await self.boxes.disk_usage()

    # -- state operations -------------------------------------------------------------
    async def snapshot_create(self, box_id: str, name: str, options: SnapshotOptions) -> SnapshotInfo:
        return await self.snapshots.create(box_id, name, options)

    async def snapshot_list(self, box_id: str) -> list[SnapshotInfo]:
        return await self.snapshots.of_box(box_id)

    async def snapshot_get(self, box_id: str, name: str) -> SnapshotInfo | None:
        return await self.snapshots.get(box_id, name)

    async def snapshot_restore(self, box_id: str, name: str) -> BoxInfo:
        return await self.snapshots.restore(box_id, name)

    async def snapshot_remove(self, box_id: str, name: str) -> None:
        await self.snapshots.remove(box_id, name)

    async def clone(self, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxInfo]:
        records = await self.clones.clone(box_id, names, options)
        if options.start_after_clone:
            return list(await asyncio.gather(*(self.start(r.id) for r in records)))  # forks resume at once
        return [self.boxes.info(r) for r in records]

    async def export_stream(self, box_id: str, options: ExportOptions, holder: str | None = None) -> ByteStream:
        return await self.transfer.export_stream(box_id, options, check_presented_holder(holder))

    async def import_stream(
        self,
        source: Callable[[], AsyncIterator[bytes]],
        name: str | None,
        untrusted: bool,
        label: str,
        box_id: str | None = None,
        nonce: str | None = None,
    ) -> BoxInfo:
        return await self.transfer.import_stream(source, name, untrusted, label, box_id, nonce)

    async def suspend(self, box_id: str) -> BoxInfo:
        return await self.memory.suspend(box_id)

    async def lease(self, box_id: str, holder: str) -> None:
        rec = self.boxes.record(box_id)
        refused = self.store.take_lease(rec.id, check_lease_holder(holder))
        if refused == "gone":
            raise BoxNotFound(f"box {rec.name!r} was removed")
        if refused == "exporting":
            raise InvalidState(f"box {rec.name!r} is being exported: move it once that export is over")
        if refused == "held":
            raise InvalidState(
                f"box {rec.name!r} is being moved by another migration: let it finish; if it was given up, release"
                " it from the home that began it (`boxvm migrate BOX --to URL --release`)"
            )

    async def release_lease(self, box_id: str, holder: str | None) -> None:
        rec = self.boxes.record(box_id)
        if not self.store.drop_lease(rec.id, None if holder is None else check_lease_holder(holder)):
            raise InvalidState(f"box {rec.name!r} is held by another migration than the one releasing it")

    # -- lifecycle --------------------------------------------------------------------
    def _sandbox(self) -> bool:
        """Whether this QEMU runs in its seccomp sandbox (probed once; said once if not)."""
        caps = qemucaps.probe(self.home.cache)
        if not caps.sandbox and not self._unsandboxed_said:
            self._unsandboxed_said = True
            log.warning("boxvm: this QEMU has no seccomp sandbox (built without libseccomp): boxes run without it")
        return caps.sandbox

    def _confined(self) -> bool:
        """Whether this QEMU runs confined to its box's files (``engine/confine``: probed
        once; said once if not)."""
        caps = qemucaps.probe(self.home.cache)
        if not caps.confined and not self._unconfined_said:
            self._unconfined_said = True
            log.warning(
                "boxvm: this kernel has no Landlock (or QEMU needs files it does not grant): QEMU runs"
                " with every file of this user in reach"
            )
        return caps.confined

    @staticmethod
    def _confinement(spec: qemu.VmSpec) -> dict[str, list[str]]:
        """What the box's QEMU reads and writes besides its tops and chains (``vm.json``'s
        ``confine``, for its supervisor's ruleset: engine/confine)."""
        writes = [str(spec.memory_file)] if spec.memory_file is not None else []
        return {"read": [str(spec.kernel), str(spec.initramfs)], "write": writes}

    def _accel_choice(self) -> accel_mod.Accel:
        if self._accel is None:
            self._accel = accel_mod.detect()
            if self._accel.name == "tcg":
                log.warning("boxvm: %s", self._accel.reason)
        return self._accel

    async def start(self, box_id: str) -> BoxInfo:
        return await self._start(box_id, warm=True)

    async def _start(self, box_id: str, warm: bool) -> BoxInfo:
        t0 = time.monotonic()
        rec = self.boxes.record(box_id)
        rule = require(Operation.START, rec.name, rec.status, rec.operation)
        resume = resumable(self.store, self.home.box_dir(rec.id), rec)
        if resume:  # on a host that cannot load it, the saved state stays for one that can
            qemucaps.require_memory_state(self.home.cache, f"resume box {rec.name!r}")
        # Boot the bundle the box was made with; if it was garbage-collected, the newest.
        bundle = bundle_mod.find(self.home, rec.guest_bundle)
        if bundle is None:
            raise EngineError("the guest bundle is missing: run `boxvm setup`")
        if bundle.id != rec.guest_bundle:
            self.store.update_box(rec.id, guest_bundle=bundle.id)
        box_dir = self.home.box_dir(rec.id)
        token = time.time()  # what it started from, for recovery if this process dies before the supervisor runs
        mine = starting.mine(token, rec.status, rec.started_at)
        write = asyncio.ensure_future(asyncio.to_thread(starting.record, box_dir, mine))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:  # the thread writes on: its record goes once written (nothing is marked)
            write.add_done_callback(lambda _: starting.discard(box_dir, token))
            raise
        if not self.store.transition(
            rec.id, rule.holds, {rec.status}, supervisor_pid=None, qemu_pid=None, error=None, started_at=token,
        ):  # fmt: skip
            starting.discard(box_dir, token)  # a racing start won: its own record stays
            raise InvalidState(f"box {rec.name!r} changed status while starting: try again")
        faults.point("start:marked")
        try:  # nothing runs yet: a failure here puts the box back (its owner lives on: never undone by recovery)
            starting.discard_leftovers(box_dir, token)
            await asyncio.to_thread(self.layers.commit, box_dir)  # a top left pending by a crash
            # A capture whose record a crash lost: recorded, since QEMU may read only the
            # layers the store names (engine/confine, Supervisor.chain_files).
            await asyncio.to_thread(self.boxes.sync_layer, rec.id)
            await asyncio.to_thread(self.boxes.settle_fresh, self.store.get_box(rec.id) or rec)  # synced before use
            opts = BoxOptions.from_dict(rec.options)
            warmed = None  # its machine's template, if it resumes one (a failed resume boots cold: fall_back)
            if warm and not resume and rec.status == BoxStatus.CONFIGURED and opts.warm:
                warmed = await asyncio.to_thread(templates.warm_into, self.home, self.store, box_dir, rec)
                resume = warmed is not None
            ram_file, ram_shared, plan, configured = box_dir / memory.RAM, True, {}, True
            if resume:
                ram_file, ram_shared, plan = await asyncio.to_thread(resume_plan, box_dir, rec)
                configured = await asyncio.to_thread(memory.has_configuration, box_dir / memory.STATE)
            else:  # a cold boot starts from fresh, empty RAM
                await asyncio.to_thread(memory.fresh_ram, box_dir, opts.memory_mib)
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
                memory_file=ram_file,
                memory_shared=ram_shared,
                incoming=resume,
                send_configuration=configured,
                sandbox=self._sandbox(),
                tsc_khz=await asyncio.to_thread(hostclock.tsc_khz, self.home.cache) if accel.name == "tcg" else None,
            )
            spawning = await _spawn_lock(box_dir, rec.name)
        except BaseException:
            self._roll_back(rec, mine)  # no supervisor was spawned: its record goes whatever happened
            raise
        try:
            self._check_still_starting(rec, box_dir, token)
        except BaseException:
            spawning.release()
            raise
        spawn: asyncio.Future[None] | None = None
        try:
            argv = qemu.argv(spec, accel)
            for name in ("ctl.sock", "qmp.sock", "agent.sock", "console.log"):
                (box_dir / name).unlink(missing_ok=True)
            (box_dir / "vm.json").write_text(
                json.dumps(
                    {"box_id": rec.id, "argv": argv, "db": str(self.home.db), "home": str(self.home.root)}
                    | {"incoming": resume, "resume": plan, "start": token}
                    | {"confine": self._confinement(spec) if self._confined() else None}
                )
            )
            # Shielded, the lock released when it ends: a start cancelled meanwhile must not let
            # a retry rewrite vm.json before the supervisor spawned here has read it.
            spawn = asyncio.ensure_future(
                asyncio.wait_for(zygote.start_supervisor(self.home.root, box_dir, rec.name), READY_TIMEOUT)
            )  # bounded: a wedged zygote must not hold the lock for the life of this process

            def spawned(done: asyncio.Future[None]) -> None:
                spawning.release()
                if not done.cancelled():
                    done.exception()  # retrieved: a cancelled start's spawn may fail with no one awaiting it

            spawn.add_done_callback(spawned)
            await asyncio.shield(spawn)  # its supervisor took the box (or refused it: then this start failed)
            conn = await self.state.conns.get(rec.id, rec.name)
            await conn.request("wait_ready", timeout=READY_TIMEOUT)
            if not resume:  # a resume's supervisor set it before answering ready (engine/memory_ops)
                await _set_guest_time(conn, rec.name)
        except BaseException as exc:
            if spawn is None:
                spawning.release()  # (else released when the spawn ends: before any cold start again below)
            if await self._abort_start(rec, mine, exc):
                raise  # nothing ran: the box is where it began (a template's disks stay for the next start)
            if (
                warmed is not None
                and isinstance(exc, Exception)
                and await asyncio.to_thread(
                    templates.fall_back, self.home, self.store, box_dir, rec, warmed, exc, token
                )
            ):
                return await self._start(box_id, warm=False)
            if isinstance(exc, Exception) and self.store.get_box(rec.id) is None:
                raise NotFound(f"box {rec.name!r} was removed while it was starting") from exc
            raise
        starting.discard(box_dir, token)  # its supervisor took the box
        self.store.add_timing(rec.id, start_ms=(time.monotonic() - t0) * 1000)
        return self.boxes.info(self.boxes.record(rec.id))

    def _check_still_starting(self, rec: BoxRecord, box_dir: Path, token: float) -> None:
        """Under the spawn lock: a stop (or remove --force) took the box while this start
        prepared it, so this start touches nothing more (a later start may hold it)."""
        now = self.store.get_box(rec.id)
        if now is None or now.status != BoxStatus.STARTING or now.started_at != token:
            starting.discard(box_dir, token)
            if now is None:
                raise NotFound(f"box {rec.name!r} was removed while it was starting")
            raise InvalidState(f"box {rec.name!r} was stopped while it was starting: start it again")

    def _roll_back(self, rec: BoxRecord, start: starting.Start) -> bool:
        """Put the box back where the start began if no supervisor took it (True); its record
        goes either way. If the store fails here, the record names no owner any more, so
        recovery undoes the start instead of leaving it ``starting`` for this process's life."""
        box_dir = self.home.box_dir(rec.id)
        try:
            back = self.store.roll_back_start(rec.id, start.token, start.prior, start.prior_started_at)
        except BaseException:
            with contextlib.suppress(OSError):
                starting.give_up(box_dir, start)  # (its record stays, for recovery)
            raise
        starting.discard(box_dir, start.token)
        return back

    async def _abort_start(self, rec: BoxRecord, start: starting.Start, exc: BaseException) -> bool:
        """Put the box back where it began if no supervisor took it (True); else stop what this
        start ran and mark the box failed -- only while the box is still this start's (its
        token): never another start's processes, nor a box undone or removed."""
        token = start.token
        if self._roll_back(rec, start):  # a supervisor spawned but not registered yet finds its start gone and exits
            await self.state.conns.drop(rec.id)
            return True
        fresh = self.store.get_box(rec.id)
        if fresh is None or fresh.started_at != token:
            return False
        await self.boxes.kill(fresh)
        await self.state.conns.drop(rec.id)
        tail = _tail(self.home.box_dir(rec.id) / "console.log")
        said = printable(str(exc), _TAIL_TOTAL)  # (a resumed fork's error quotes its guest)
        message = f"box {rec.name!r} failed to start: {said}" + (f"\nconsole:\n{tail}" if tail else "")
        # FAILED -> FAILED too: the supervisor may have recorded QEMU's exit first; keep the
        # console tail. A box stopped (or started again) meanwhile is left as it is.
        self.store.transition(
            rec.id, BoxStatus.FAILED, {BoxStatus.STOPPING, BoxStatus.FAILED}, during_operation=True, token=token,
            supervisor_pid=None, qemu_pid=None, error=message,
        )  # fmt: skip
        if isinstance(exc, EngineError):
            exc.message = message
            exc.args = (message,)
        return False

    async def stop(self, box_id: str, timeout: float) -> BoxInfo:
        t0 = time.monotonic()
        rec = self.boxes.record(box_id)
        rule = require(Operation.STOP, rec.name, rec.status, rec.operation)
        if not self.store.transition(rec.id, rule.holds, {rec.status}):
            raise InvalidState(f"box {rec.name!r} changed status while stopping: try again")
        # Read again now that it left ``starting``: a supervisor may have registered since;
        # none can register, nor record its QEMU, from now on, so these pids are final.
        rec = self.store.get_box(rec.id) or rec
        try:
            conn = await self.state.conns.get(rec.id, rec.name)
            await conn.request("stop", timeout=timeout)
        except EngineError:
            await self.boxes.kill(rec)
            self.store.transition(
                rec.id, BoxStatus.STOPPED, {BoxStatus.STOPPING}, during_operation=True, supervisor_pid=None,
                qemu_pid=None,
            )  # fmt: skip
        await self.state.conns.drop(rec.id)
        deadline = time.monotonic() + 10  # the supervisor exits right after QEMU
        while rec.supervisor_pid and pid_is(rec.supervisor_pid, rec.id) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.store.add_timing(rec.id, stop_ms=(time.monotonic() - t0) * 1000)
        return self.boxes.info(self.boxes.record(rec.id))

    async def _qmp_toggle(self, box_id: str, op: Operation, command: str, undo: str, to: BoxStatus) -> BoxInfo:
        rec = self.boxes.record(box_id)
        require(op, rec.name, rec.status, rec.operation)
        conn = await self.state.conns.get(rec.id, rec.name)
        await conn.request(command)
        if not self.store.transition(rec.id, to, {rec.status}):
            now = self.boxes.record(rec.id)
            if now.status != to:  # (the same toggle by another caller is a success)
                if now.status == rec.status:  # a state operation claimed it meanwhile: undo ours
                    await conn.request(undo)
                raise InvalidState(
                    f"cannot {op} box {rec.name!r}: it became {now.shown_status.value} meanwhile; try again"
                )
        return self.boxes.info(self.boxes.record(rec.id))

    async def pause(self, box_id: str) -> BoxInfo:
        return await self._qmp_toggle(box_id, Operation.PAUSE, "pause", "resume", BoxStatus.PAUSED)

    async def resume(self, box_id: str) -> BoxInfo:
        return await self._qmp_toggle(box_id, Operation.RESUME, "resume", "pause", BoxStatus.RUNNING)

    # -- inside the box ---------------------------------------------------------------
    async def _running(self, box_id: str, op: Operation) -> tuple[BoxRecord, Connection]:
        rec = self.boxes.record(box_id)
        require(op, rec.name, rec.status, rec.operation)
        return rec, await self.state.conns.get(rec.id, rec.name)

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
        stderr = _said(chan)
        try:
            try:
                async for chunk in tar:
                    await chan.write(chunk)
            except BaseException:
                chan.signal(signal.SIGKILL)  # an input cut off mid-stream must not half-apply quietly
                raise
            chan.close_stdin()
            result = await chan.wait()
            if result.get("exit_code"):
                raise NotFound(f"cannot copy into {box_path}: {await stderr}")
        finally:
            stderr.cancel()

    async def get_files(self, box_id: str, box_path: str) -> ByteStream:
        if not box_path.startswith("/"):
            raise InvalidArgument(f"box path {box_path!r} must be absolute")
        _rec, conn = await self._running(box_id, Operation.COPY)
        chan = conn.open_channel({"op": "get", "path": box_path})
        stderr = _said(chan)
        chan.close_stdin()
        chunks = aiter(chan.stdout)
        try:
            first = await anext(chunks, b"")
        except BaseException:
            stderr.cancel()
            raise

        async def fail() -> NoReturn:
            result = await chan.wait()
            if result.get("exit_code"):
                raise NotFound(f"cannot copy {box_path} out of the box: {await stderr}")
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
            stderr.cancel()

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
        def users(digest: str) -> list[str]:
            return [b.name for b in self.store.list_boxes() if b.image_digest == digest]

        await self.images.remove(reference, users)

    async def logs(self, box_id: str) -> str:
        rec = self.boxes.record(box_id)
        return console.tail(self.home.box_dir(rec.id) / "console.log")  # bounded: the guest wrote it

    async def close(self) -> None:
        await self.state.conns.close()
        await asyncio.to_thread(self.layers.trash.flush)
        self.store.close()


async def _spawn_lock(box_dir: Path, label: str) -> starting.SpawnLock:
    """The box's spawn lock (``starting.SpawnLock``), waited for at most ``READY_TIMEOUT``."""
    try:
        return await asyncio.wait_for(starting.SpawnLock.acquire(box_dir), READY_TIMEOUT)
    except FileNotFoundError:  # its directory went with a remove --force
        raise NotFound(f"box {label!r} was removed while it was starting") from None
    except TimeoutError:
        raise InvalidState(f"another start of box {label!r} is still spawning its VM: try again") from None


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


def _said(chan: Channel) -> asyncio.Task[str]:
    """What a copy's guest side says on stderr, read while the copy runs (its bytes unread
    would keep the channel from ever timing out: the wait could be the host's), kept to its
    first ``_SAID`` bytes, shown ``printable``."""

    async def read() -> str:
        head = b""
        async for chunk in chan.stderr:
            head += chunk[: _SAID - len(head)]
        return printable(head.decode(errors="replace").strip())

    return asyncio.ensure_future(read())


_SAID = 4096
_TAIL_LINE = 300  # characters of one console line quoted in a failed start's error
_TAIL_TOTAL = 6000  # characters of the whole quote (it is stored, and listed with the box)
_BEFORE_PANIC = 8  # console lines quoted from just before a kernel panic


def _tail(path: Path, lines: int = 15) -> str:
    """What the console says of why the guest stopped: its earlier boxvm messages, the agent's
    last Python traceback, and its last lines -- or, if the kernel panicked (PID 1 exited: the
    agent, or an init before it), the lines before the panic, the panic and the process that
    died, but not the panic's trace, which says nothing of why and would fill the quote."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    panic = next((i for i in range(len(text) - 1, -1, -1) if "Kernel panic" in text[i]), None)
    if panic is None:
        end, last = max(len(text) - lines, 0), text[-lines:]
    else:  # its dump names the process: "CPU: 0 PID: 1 Comm: sh ..."
        end, last = panic, [text[panic], *[line for line in text[panic + 1 : panic + 40] if " Comm: " in line][:1]]
    starts = [i for i in range(end) if "Traceback (most recent call last)" in text[i]]
    span = range(0)
    if starts:  # to its exception line, the first not indented after its header
        stop = next((i for i in range(starts[-1] + 1, end) if not text[i].startswith(" ")), end - 1)
        span = range(starts[-1], stop + 1)  # (a range: `in` is O(1), a guest's 1M-line trace costs no more)
    trace = list(span) if len(span) <= 12 else [span[0], *span[-11:]]  # its end says what failed
    said = ("boxvm:", "boxvm-agent:", "Kernel panic")
    marks = [i for i in range(end) if i not in span and any(m in text[i] for m in said)][-5:]
    near = range(max(end - _BEFORE_PANIC, 0), end) if panic is not None else range(0)  # what PID 1 said last
    quoted = [text[i] for i in sorted({*marks, *trace, *near})] + last
    return printable("\n".join(printable(line, _TAIL_LINE) for line in quoted), _TAIL_TOTAL, tail=True)
