"""The supervisor's memory-state operations: suspend, and resume instead of a boot.

A mixin of :class:`boxvm.engine.supervisor.Supervisor` (kept here so the supervisor's own
module stays about channels and QEMU's life). ``engine/memory`` does the QMP work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from boxvm import faults
from boxvm.disks.layers import LIVE_DIR, PENDING, LayerStore
from boxvm.engine import memory, memory_live, memory_precopy
from boxvm.engine.agentlink import AgentLink
from boxvm.engine.qmp import QMP
from boxvm.errors import EngineError
from boxvm.status import BoxStatus
from boxvm.store import Store

log = logging.getLogger("boxvm.supervisor")

RESUME_PING_TIMEOUT = 30.0
_TARGET_PAGE = 4096  # the guest's (x86) page: the unit of QEMU's RAM stream


class _Supervisor(Protocol):
    """What these operations use of ``supervisor.Supervisor`` (named here: no import cycle)."""

    dir: Path
    box_id: str
    argv: list[str]
    qmp: QMP
    link: AgentLink
    store: Store
    layers: LayerStore
    capture_lock: asyncio.Lock
    ready: asyncio.Future[float]
    exited: asyncio.Event
    qemu: asyncio.subprocess.Process | None
    t0: float
    stop_requested: bool
    client_paused: bool
    resume_plan: dict[str, Any]
    base_cached: bool
    final_status: BoxStatus
    unpublished: tuple[str, str | None] | None

    async def settle(self) -> None: ...
    async def quit(self) -> None: ...
    async def switch(self, req: dict[str, Any], capture: tuple[str, str | None]) -> dict[str, Any]: ...


class MemoryOps:
    """Suspend and resume for a :class:`Supervisor` (its attributes are used as they are)."""

    final_status: BoxStatus = BoxStatus.STOPPED  # what QEMU's exit after a requested stop means

    async def op_suspend(self: _Supervisor, req: dict[str, Any]) -> dict[str, Any]:
        """Save the memory and device state with the box, then let QEMU exit.

        The capture lock keeps a disk capture from switching the disk meanwhile. If saving
        fails the VM runs on as before (QEMU is told ``cont`` if it was running). A box
        whose RAM is private (a fork, a warm start) gets a RAM file of its own: the
        template's with the pages the guest wrote over it (``_save_written``), or, where
        those cannot be read, its RAM goes in the migration stream (``_save_private``)."""
        shape = req.get("shape")
        if not isinstance(shape, dict):
            raise EngineError("suspend needs the machine's shape")
        private = bool(self.resume_plan.get("private"))
        async with _private_ram(self, "suspend") as written, self.capture_lock:
            await self.settle()  # a capture switched to but not yet published: none may outlive the VM
            was_running = await self.qmp.status() == "running"
            try:
                if written is not None:
                    timings = await _save_written(self, shape, written)
                elif private:
                    timings = await _save_private(self, shape)
                else:
                    self.link.hold()  # QEMU would move agent data in guest RAM after the state was saved
                    timings = await memory.save(self.qmp, self.dir, shape)
            except BaseException:
                try:
                    await asyncio.to_thread(memory.discard_state, self.dir)
                    if was_running and not self.client_paused:
                        with contextlib.suppress(Exception):
                            await self.qmp.cont()
                finally:
                    self.link.release()
                raise
            faults.point("suspend:saved")
            self.stop_requested = True
            self.final_status = BoxStatus.SUSPENDED
            t_quit = time.monotonic()
            await self.quit()
            timings["quit_ms"] = (time.monotonic() - t_quit) * 1000
        return {"ok": True, **timings}

    async def resume_incoming(self: _Supervisor) -> None:
        """Load the saved state into the QEMU just started with ``-incoming defer``, run
        it, and check the agent answers; then the box is ready (its agent sends no HELLO:
        it never restarted). A fork (``resume_plan["identity"]``) is re-identified too."""
        t0 = time.monotonic()
        plan = self.resume_plan
        try:
            load_ms = await memory.load(self.qmp, self.dir, with_ram=bool(plan.get("with_ram")))
            await self.qmp.cont()
            t_cont = time.monotonic()
            # The agent may still hold channels of the previous run: number ours elsewhere.
            self.link.next_gid = (1 << 24) + secrets.randbelow(1 << 30)
            self.link.greeted = True
            # The guest's RNG state is a copy of the saved one: mix in fresh host entropy and
            # reseed (an older agent lacks the request: its RNG reseeds only on its own); its
            # answer also shows the agent is alive. A fork's re-identification is sent with it
            # (the agent answers in order; one round trip of a guest whose TCG code cache is cold).
            requests = [self.link.request({"op": "reseed", "entropy": os.urandom(64).hex()}, RESUME_PING_TIMEOUT)]
            if plan.get("identity"):  # another box's guest: it takes this box's name and machine-id
                requests.append(self.link.request({"op": "reidentify", **plan["identity"]}, RESUME_PING_TIMEOUT))
            tasks = [asyncio.ensure_future(r) for r in requests]
            probe = asyncio.ensure_future(_clock_probe(self.link))  # a first clock read right behind them
            answers = await asyncio.gather(*tasks)
            t_answered = time.monotonic()
            clock = await probe
            seeded, ident = answers[0], answers[1:]
            if "error" in seeded:
                log.warning("the guest RNG was not reseeded: %s", seeded["error"]["message"])
            if ident and "error" in ident[0]:
                raise EngineError(f"the resumed guest could not be re-identified: {ident[0]['error']['message']}")
            await _step_clock(self.link, clock)
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"resuming the saved memory state failed: {exc}"))
            raise
        now = time.monotonic()
        ready_ms = (now - self.t0) * 1000
        self.store.transition(self.box_id, BoxStatus.RUNNING, {BoxStatus.STARTING}, error=None)
        # Where a resume's time goes: QEMU up and connected, the state loaded, the guest's
        # first answers (its code translated anew under TCG), the clock step.
        phases = {"qemu": t0 - self.t0, "guest": t_answered - t_cont, "clock": now - t_answered}
        self.store.add_timing(
            self.box_id, resume_load_ms=load_ms, resume_ms=(now - t0) * 1000, boot_ms=ready_ms,
            **{f"resume_{k}_ms": v * 1000 for k, v in phases.items()},
        )  # fmt: skip
        if not self.ready.done():
            self.ready.set_result(ready_ms)

    async def op_capture_memory(self: _Supervisor, req: dict[str, Any]) -> dict[str, Any]:
        """A memory snapshot's capture: the disk, the device state and the RAM at one
        instant, into ``memory.CAPTURE`` in the box directory; the VM then runs on.

        A box's own RAM file is copied while the guest runs (``memory_precopy``); the vCPUs
        then stay stopped through the disk switch, the copy of the pages written meanwhile
        and, alongside it, the device state (the guest's pause); the fsyncs and the record
        follow the ``cont``. A fork's or warm-started box's RAM is private (``memory.BASE``
        mapped share=off): the template's file is copied while the guest runs, and with the
        vCPUs stopped the pages the guest wrote are copied over it from QEMU's memory and
        QEMU saves its devices alone (``_written_pages``), so the snapshot is a RAM file
        like a booted box's. Where that cannot be done, and on KVM, QEMU's migration puts
        the RAM in the state (``stream``; live while the guest runs under KVM), the disk
        switched when QEMU stops the vCPUs for the switch-over (``memory_live``). The disk
        capture is published like any other (``settle``)."""
        shape = req.get("shape")
        if not isinstance(shape, dict):
            raise EngineError("a memory capture needs the machine's shape")
        if self.qemu is None:
            raise EngineError("QEMU is not running")
        live = memory_live.limits(kvm=_on_kvm(self.argv))["limit_s"] > 0  # QEMU's pre-copy (KVM)
        async with _private_ram(self, "memory_snapshot", readable=not live) as written:
            return await _capture_memory(self, self.dir / memory.CAPTURE, shape, written)


@contextlib.asynccontextmanager
async def _private_ram(
    sup: _Supervisor, what: str, readable: bool = True
) -> AsyncIterator[memory_precopy.WrittenPages | None]:
    """Before a save, outside the capture lock: for a box whose RAM is private, the pages
    its guest wrote (``_written_pages``; unless not ``readable``: the stream is wanted),
    or else its base file read into the page cache for the stream (``_cache_base``).
    None for the stream and for a box whose RAM is its own."""
    private = bool(sup.resume_plan.get("private"))
    written = await _written_pages(sup) if private and readable else None
    try:
        if private and written is None:
            await _cache_base(sup, what)  # nothing writes the file
        yield written
    finally:
        if written is not None:
            written.close()


async def _capture_memory(
    sup: _Supervisor, dest: Path, shape: dict[str, Any], written: memory_precopy.WrittenPages | None
) -> dict[str, Any]:
    """``op_capture_memory`` under the capture lock: a RAM file (the box's own, or the
    template's with the ``written`` pages of a private RAM over it) or, for private RAM
    whose pages cannot be read here, the migration stream."""
    stream = bool(sup.resume_plan.get("private")) and written is None
    async with sup.capture_lock:
        await memory.check_savable(sup.qmp)  # before the RAM copy of a box whose RAM is its own
        await sup.settle()
        await asyncio.to_thread(memory.fresh_dir, dest)
        try:
            try:
                result = await (_capture_stream(sup, dest, shape) if stream else _capture_file(sup, dest, written))
            finally:
                if sup.unpublished is None:  # the switch did not happen
                    (sup.dir / PENDING).unlink(missing_ok=True)
                await sup.settle()
            await asyncio.to_thread(memory.seal, dest, shape, "stream" if stream else "file")
        except BaseException:  # the state or the RAM copy is RAM-sized: not kept until the next capture
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise
    return result


async def _written_pages(sup: _Supervisor) -> memory_precopy.WrittenPages | None:
    """What the guest wrote of its private RAM, for ``_capture_file`` to copy with the
    vCPUs stopped over a copy of the template's RAM file made while it runs, instead of
    QEMU migrating all of its RAM (which reads every page and writes every non-zero one
    while the guest is stopped). None where QEMU's memory cannot be read here (or for the
    benchmarks' baseline): the RAM then goes in the migration stream. (Every QEMU with
    ``x-ignore-shared``, which memory state needs, has ``xen-save-devices-state``.)"""
    assert sup.qemu is not None
    if os.environ.get("BOXVM_MEMORY_STREAM") == "1":  # benchmarks: the migration stream as the baseline
        return None
    try:
        return await memory.run_to_end(
            memory_precopy.WrittenPages, sup.qemu.pid, sup.dir / memory.BASE, undo=memory_precopy.WrittenPages.close
        )
    except memory_precopy.Unavailable as exc:
        log.info("memory snapshot: %s; the RAM goes in the migration stream", exc)
        return None


async def _capture_file(
    sup: _Supervisor, dest: Path, written: memory_precopy.WrittenPages | None = None
) -> dict[str, Any]:
    """The capture of a box whose RAM is its own file, or of private RAM whose ``written``
    pages are copied over the template's file (see ``op_capture_memory``): the same RAM
    file and device state either way."""
    assert sup.qemu is not None
    ram, ram_copy = sup.dir / (memory.BASE if written else memory.RAM), dest / memory.RAM
    t_pre = time.monotonic()
    if written is None:
        pre = await asyncio.to_thread(memory_precopy.start, sup.qemu.pid, ram, ram_copy)
    else:  # the template's data while the guest runs; what it wrote, once stopped
        await asyncio.to_thread(memory.sparse_copy, ram, ram_copy)
    precopy_ms = (time.monotonic() - t_pre) * 1000
    # The pending top is a new file nothing uses yet: written (and fsynced) before the pause.
    layer, parent = await asyncio.to_thread(sup.layers.prepare_capture, sup.dir)
    was_running = await sup.qmp.status() == "running"
    t0 = time.monotonic()
    sup.link.hold()  # the agent's socket still: QEMU moves nothing in guest RAM between the RAM copy and the devices
    try:
        await sup.qmp.stop()
        switched = await sup.switch({"quiesce": False}, (layer, parent))
        # The RAM copy (this process) and the device state (QEMU) overlap; both end
        # before the ``cont`` (a migration still running then would stop the VM again).
        ram_done, state_done = await asyncio.gather(
            memory.run_to_end(_timed_finish, pre, ram, ram_copy)
            if written is None
            else memory.run_to_end(_timed_written, written, ram_copy),
            memory.write_state_to(sup.qmp, dest)
            if written is None
            else memory.write_devices_to(sup.qmp, dest, sup.dir / LIVE_DIR),
            return_exceptions=True,
        )
        for outcome in (ram_done, state_done):
            if isinstance(outcome, BaseException):
                raise outcome
        (copied, mode), ram_copy_ms = ram_done  # type: ignore[misc]
        state_ms = state_done
        faults.point("memory:copied")
        await _hold_at_stop()
    finally:
        try:
            if was_running and not sup.client_paused:  # a client's pause meanwhile stands
                await sup.qmp.cont()
        finally:
            sup.link.release()
    pause_ms = (time.monotonic() - t0) * 1000
    if written is not None:
        sup.store.add_timing(
            sup.box_id,
            memory_snapshot_base_copy_ms=precopy_ms,
            memory_snapshot_written_ms=ram_copy_ms,
            memory_snapshot_written_mib=copied / (1 << 20),
        )
    log.info(
        "memory snapshot: pause %.1f ms (switch %.1f, RAM %s %.1f ms %d bytes, device state %.1f ms)",
        pause_ms, switched["switch_ms"], mode, ram_copy_ms, copied, state_ms,
    )  # fmt: skip
    return {
        "layer": layer,
        "parent": parent,
        "consistency": switched["consistency"],
        "node": switched["node"],
        "pause_ms": pause_ms,
        "switch_ms": switched["switch_ms"],
        "host_window_ms": (time.monotonic() - t0) * 1000,
        "precopy_ms": precopy_ms,
        "ram_copy_ms": ram_copy_ms,
        "ram_copied_bytes": float(copied),
        "ram_copy_mode": mode,
        "state_ms": state_ms,
    }


async def _capture_stream(sup: _Supervisor, dest: Path, shape: dict[str, Any]) -> dict[str, Any]:
    """The capture of a box whose RAM is private into QEMU's migration stream (under KVM,
    or where its written pages cannot be read): the live pre-copy (KVM) or a stop-and-copy
    into a prefilled state file, the disk switched while QEMU holds the vCPUs stopped for
    the switch-over."""
    limits = memory_live.limits(kvm=_on_kvm(sup.argv))
    prefill = await asyncio.to_thread(_expected_stream, sup, shape) if limits["limit_s"] <= 0 else 0
    layer, parent = await asyncio.to_thread(sup.layers.prepare_capture, sup.dir)
    was_running = await sup.qmp.status() == "running"
    switched: dict[str, Any] = {}

    async def at_stop() -> None:
        switched.update(await sup.switch({"quiesce": False}, (layer, parent)))

    t0 = time.monotonic()
    try:
        saved = await memory_live.save(
            sup.qmp,
            dest / f"{memory.STATE}.tmp",
            at_stop,
            resume=lambda: not sup.client_paused,
            prefill=prefill,
            **limits,
        )
    except BaseException:
        if was_running and not sup.client_paused:  # the migration was cancelled: the guest runs on
            with contextlib.suppress(Exception):
                await sup.qmp.cont()
        raise
    faults.point("memory:copied")
    pause_ms = saved.pause_ms
    _record_live(sup, "memory_snapshot", saved)
    log.info(
        "memory snapshot (RAM in the stream): pause %.1f ms (switch %.1f, QEMU's downtime %.0f, completion to cont"
        " %.1f), pre-copy %.1f ms, %d passes, %d bytes%s",
        pause_ms, switched["switch_ms"], saved.downtime_ms, saved.tail_ms, saved.precopy_ms, saved.passes,
        saved.ram_bytes,
        f"; stop-and-copy: {saved.fallback}" if saved.fallback else "",
    )  # fmt: skip
    return {
        "layer": layer,
        "parent": parent,
        "consistency": switched["consistency"],
        "node": switched["node"],
        "pause_ms": pause_ms,
        "switch_ms": switched["switch_ms"],
        "host_window_ms": (time.monotonic() - t0) * 1000,
        "precopy_ms": saved.precopy_ms,
        "ram_copy_ms": 0.0,
        "ram_copied_bytes": float(saved.ram_bytes),
        "ram_copy_mode": "stop-and-copy" if saved.fallback else "live",
        "state_ms": saved.state_ms,
        "qemu_downtime_ms": saved.downtime_ms,
    }


def _on_kvm(argv: list[str]) -> bool:
    """Whether the box's QEMU runs on KVM (``-accel kvm``), which tracks dirty pages itself."""
    return any(a == "-accel" and b == "kvm" for a, b in itertools.pairwise(argv))


async def _save_written(
    sup: _Supervisor, shape: dict[str, Any], written: memory_precopy.WrittenPages
) -> dict[str, float]:
    """A suspend of private RAM into a RAM file of the box's own, so that it resumes like a
    booted box (mapping the file) instead of loading all of its RAM from a stream: the
    template's file copied while the guest runs, then, stopped, the pages the guest wrote
    over the copy and the devices alone beside it; the copy becomes ``memory.RAM``, and
    ``memory.BASE`` goes once the record vouches for the state."""
    (sup.dir / memory.META).unlink(missing_ok=True)  # the old record must not vouch for the new state
    tmp = sup.dir / f"{memory.RAM}.tmp"
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(memory.sparse_copy, sup.dir / memory.BASE, tmp)
        t_copied = time.monotonic()
        sup.link.hold()  # QEMU would move agent data in guest RAM between the copy and the device state
        await sup.qmp.stop()
        await sup.qmp.status()  # a turn of QEMU's main loop: what the socket held at the stop is in RAM
        t_stop = time.monotonic()
        faults.point("memory:stopped")
        ram_done, state_done = await asyncio.gather(
            memory.run_to_end(_copy_written, written, tmp),
            memory.write_devices_to(sup.qmp, sup.dir, sup.dir / LIVE_DIR),
            return_exceptions=True,
        )
        for outcome in (ram_done, state_done):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(ram_done, int)
        t_saved = time.monotonic()
        sup.store.add_timing(sup.box_id, suspend_written_mib=ram_done / (1 << 20))
        await memory.run_to_end(memory.adopt_ram, sup.dir, tmp, shape)  # the commit: nothing may fail after it
    except BaseException:
        tmp.unlink(missing_ok=True)
        if (sup.dir / memory.BASE).exists():  # not committed: QEMU runs on from the base; a RAM copy is no use
            (sup.dir / memory.RAM).unlink(missing_ok=True)
        raise
    return {
        "base_copy_ms": (t_copied - t0) * 1000,
        "stopped_ms": (t_saved - t_stop) * 1000,  # the vCPUs' stop to the state's end, as _save_private's
        "save_ms": (t_saved - t_stop) * 1000,
        "sync_ms": (time.monotonic() - t_saved) * 1000,
    }


async def _save_private(sup: _Supervisor, shape: dict[str, Any]) -> dict[str, float]:
    """A suspend's save of private RAM into the state, then the record: a stop-and-copy. A
    pre-copy would only let the guest run on a little longer before the same freeze while
    the suspend as a whole took longer, and a live save of a fork just resumed was seen to
    lose guest writes once (ENGINEERING, "Live pre-copy of private RAM")."""
    (sup.dir / memory.META).unlink(missing_ok=True)  # the old record must not vouch for the new state

    async def at_stop() -> None:
        faults.point("memory:stopped")

    prefill = await asyncio.to_thread(_expected_stream, sup, shape)
    saved = await memory_live.save(sup.qmp, sup.dir / f"{memory.STATE}.tmp", at_stop, limit_s=0, prefill=prefill)
    t_saved = time.monotonic()
    await asyncio.to_thread(memory.seal, sup.dir, shape, "stream")
    _record_live(sup, "suspend", saved)
    return {
        "stopped_ms": saved.pause_ms,  # the vCPUs' stop to the migration's end
        "save_ms": saved.state_ms,
        "sync_ms": (time.monotonic() - t_saved) * 1000,
    }


def _expected_stream(sup: _Supervisor, shape: dict[str, Any]) -> int:
    """About what a stop-and-copy of this box's private RAM writes, to prefill its state
    file with (``memory.StateFile.prefill``): the template file's data plus the pages the
    guest wrote (pages in both count twice: ~40% too much after a warm start here), 8
    bytes of header per data page, 9 bytes (a zero page's record) for every page, 1 MiB
    for the device state. Too much costs the prefill's time and a truncation, too little
    the old cost for the rest; 0 (no prefill) if QEMU's mappings cannot be read."""
    assert sup.qemu is not None
    ram = int(shape.get("memory_mib", 0)) << 20
    base = sup.dir / memory.BASE
    try:
        data = min(os.stat(base).st_blocks * 512 + memory_precopy.written_bytes(sup.qemu.pid, base), ram)
    except (OSError, ValueError) as exc:
        log.info("the memory state is not prefilled: QEMU's mappings were not readable (%s)", type(exc).__name__)
        return 0
    return data + data // _TARGET_PAGE * 8 + ram // _TARGET_PAGE * 9 + (1 << 20)


async def _cache_base(sup: _Supervisor, what: str) -> None:
    """Before the first save of private RAM, have its file in the page cache before the
    guest is stopped (``memory.read_through``), so the save's pass over it, which a
    stop-and-copy makes with the guest stopped, does not fault in the holes one page at a
    time. Once per supervisor: the pages stay cached, shared by every box mapping the file,
    unless reclaimed. Timed as ``<what>_base_cache_ms`` (nothing for a box whose RAM is its own)."""
    if not sup.resume_plan.get("private"):
        return
    t0 = time.monotonic()
    if not sup.base_cached:
        await asyncio.to_thread(memory.read_through, sup.dir / memory.BASE)
        sup.base_cached = True
    sup.store.add_timing(sup.box_id, **{f"{what}_base_cache_ms": (time.monotonic() - t0) * 1000})


def _record_live(sup: _Supervisor, what: str, saved: memory_live.Outcome) -> None:
    """Say in the box's timings how a live save went, and whether the guest had to be
    stopped before QEMU converged (``<what>_stop_and_copy`` 1.0, the reason in the log)."""
    sup.store.add_timing(
        sup.box_id,
        **{
            f"{what}_precopy_ms": saved.precopy_ms,
            f"{what}_precopy_passes": float(saved.passes),
            f"{what}_qemu_downtime_ms": saved.downtime_ms,
            f"{what}_start_pause_ms": saved.start_pause_ms,
            f"{what}_stop_and_copy": 1.0 if saved.fallback else 0.0,
            f"{what}_prefill_ms": saved.prefill_ms,
            f"{what}_stream_mib": saved.stream_bytes / (1 << 20),
        },
    )


async def _clock_probe(link: AgentLink) -> tuple[int, int] | None:
    """(round trip, guest minus host midpoint) in ns of one ``clock`` read, as NTP does; None
    from an agent without the request."""
    t0 = time.time_ns()
    answer = await link.request({"op": "clock"}, RESUME_PING_TIMEOUT)
    t1 = time.time_ns()
    if "error" in answer:
        return None
    return t1 - t0, int(answer["ns"]) - (t0 + t1) // 2


async def _step_clock(link: AgentLink, first: tuple[int, int] | None) -> None:
    """Step the resumed guest's wall clock to the host's before it is ready (it stood still
    while saved): the offset of the tighter of two reads (the first went out with the
    reseed), so the error is at most half that read's round trip."""
    if first is None:
        log.warning("the resumed guest keeps its own clock: its agent cannot read it")
        return
    second = await _clock_probe(link)
    _, offset = min(first, second) if second is not None else first
    answer = await link.request({"op": "clock", "step_ns": -offset}, RESUME_PING_TIMEOUT)
    if "error" in answer:
        log.warning("the resumed guest's clock was not set: %s", answer["error"]["message"])


def _timed_finish(pre: memory_precopy.PreCopy | None, ram: Path, dest: Path) -> tuple[tuple[int, str], float]:
    t0 = time.monotonic()
    return memory_precopy.finish(pre, ram, dest), (time.monotonic() - t0) * 1000


def _timed_written(written: memory_precopy.WrittenPages, dest: Path) -> tuple[tuple[int, str], float]:
    t0 = time.monotonic()
    return (_copy_written(written, dest), "written"), (time.monotonic() - t0) * 1000


def _copy_written(written: memory_precopy.WrittenPages, dest: Path) -> int:
    """``written.copy_to(dest)``, its failures (QEMU's mappings changed or its memory gone,
    with the guest stopped) an EngineError the capture or suspend reports."""
    try:
        return written.copy_to(dest)
    except (memory_precopy.Unavailable, OSError) as exc:
        raise EngineError(f"the guest's written memory could not be copied: {exc}") from exc


async def _hold_at_stop() -> None:
    """For tests: with ``BOXVM_MEMORY_HOLD=<path>`` set, a memory capture creates ``<path>``
    at the end of the guest's pause and waits (up to 60 s) until it is removed, so a test can
    compare the copied RAM with the RAM itself at that instant. Unset, one dict lookup."""
    path = os.environ.get("BOXVM_MEMORY_HOLD")
    if not path:
        return
    Path(path).touch()
    deadline = time.monotonic() + 60
    while os.path.exists(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
