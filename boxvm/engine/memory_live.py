"""Save a running guest's private RAM with QEMU's own live pre-copy, stopping it only at the end.

A fork's or warm-started box's RAM is a private (``share=off``) mapping of a snapshot's or
template's RAM file: its written pages exist only in QEMU's memory. Where boxvm cannot read
them out of QEMU itself (``memory_precopy.WrittenPages``), and for a memory snapshot under
KVM, its suspend or memory snapshot puts the RAM in the migration stream (``ram: stream``).
Migrated with the guest stopped throughout, that paused a warm-started guest for seconds
(a stop-and-copy, still what TCG gets in this fallback). Here the ``migrate`` starts
while the guest runs: QEMU sends every page once, then again the pages its dirty bitmap saw
written (it works under TCG), until what is left fits the ``downtime-limit``. With the
``pause-before-switchover`` capability QEMU then stops the vCPUs and waits in
``pre-switchover`` with the block devices still active; the caller takes the disk capture
there (the vCPUs are stopped: RAM and disk are of that one instant), the migration sends
the last pages and the device state, and the caller runs the guest again (``cont``, which
also reactivates the block devices QEMU inactivated at completion) or lets QEMU quit.

A guest that writes faster than the stream drains would never converge: after
``PRECOPY_PASSES`` passes, or ``limit_s`` seconds after the first pass over all of RAM (the
first pass must be sent whole either way: stopping the guest during it only lengthens the
pause), the guest is stopped (QEMU's ``stop``) and the migration finishes with the vCPUs
stopped, as a stop-and-copy would; the outcome says so. QEMU's events (capability
``events``) tell each pass and the switch-over at once: no polling adds to the pause.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxvm.engine import memory
from boxvm.engine.qmp import QMP, Events, QMPCommandError, without_paths
from boxvm.errors import EngineError

log = logging.getLogger("boxvm.memory")

DOWNTIME_LIMIT_MS = 50  # what QEMU may leave for the switch-over, by its bandwidth estimate
MAX_BANDWIDTH = 1 << 40  # bytes/s; QEMU's default (32 MiB/s) is for networks, this is a local file
PRECOPY_SECONDS = 5.0  # after the first pass; then the guest is stopped and the copy finishes as a stop-and-copy
PRECOPY_PASSES = 30
MIGRATE_TIMEOUT = 300.0  # the whole migration (a first pass over 2 GiB took 14 s at load 7)


def limits(kvm: bool) -> dict[str, float]:
    """The pre-copy's time bound: ``BOXVM_PRECOPY_MAX_S`` from the supervisor's environment
    (benchmarks and tests: ``0`` is the stop-and-copy baseline), else ``PRECOPY_SECONDS``
    where KVM tracks the guest's dirty pages and 0 (a stop-and-copy) under TCG: there a
    live save of a running guest was seen to lose its writes, also with the guest stopped
    across the migration's start (docs/ENGINEERING.md, "The live pre-copy lost-write")."""
    default = PRECOPY_SECONDS if kvm else 0.0
    raw = os.environ.get("BOXVM_PRECOPY_MAX_S")
    try:
        return {"limit_s": float(raw) if raw else default}
    except ValueError:
        log.warning("BOXVM_PRECOPY_MAX_S=%r is not a number of seconds: %g s it is", raw, default)
        return {"limit_s": default}


@dataclass
class Outcome:
    """How a live save went (times in ms)."""

    pause_ms: float  # the vCPUs' stop (QEMU's STOP event or its downtime's start) to ``cont`` done or to completed
    precopy_ms: float  # from the migrate to the vCPUs' stop: the guest ran meanwhile
    state_ms: float  # from the migrate to completed
    passes: int  # QEMU's dirty-bitmap passes
    fallback: str | None  # why the guest was stopped before QEMU converged, or None
    ram_bytes: int  # what the stream carried of RAM
    downtime_ms: float  # QEMU's own figure: from just before its stop to completed
    tail_ms: float  # from QEMU's completion to ``cont`` done (or to the state's end)
    start_pause_ms: float  # the guest's short stop across the migration's start
    prefill_ms: float = 0.0  # writing the state file's prefill, before the guest stopped
    stream_bytes: int = 0  # the state file as QEMU left it


async def save(
    qmp: QMP,
    tmp: Path,
    at_stop: Callable[[], Awaitable[None]] | None = None,
    resume: Callable[[], bool] | None = None,
    limit_s: float = PRECOPY_SECONDS,
    passes: int = PRECOPY_PASSES,
    prefill: int = 0,
) -> Outcome:
    """Migrate the VM, RAM included, into ``tmp`` while it runs; ``at_stop`` runs once the
    vCPUs are stopped for the switch-over (block devices still active). A VM that was
    running runs again (``cont``) after the start's short stop and the moment the migration
    is done if ``resume()`` says so then (not if a client paused it meanwhile: the copy then
    goes on as a stop-and-copy); else it is left stopped (``postmigrate``,
    block devices inactive) for the caller to quit or a client to ``cont``.

    ``limit_s`` <= 0 stops the guest first: the migration is then a plain stop-and-copy
    (the baseline this replaced). ``prefill``: bytes of the file written before the guest
    stops (``memory.StateFile``; the stream's expected size). A failure cancels the
    migration and raises; a VM an earlier save left stopped is refused (``memory.check_savable``)."""
    await memory.check_savable(qmp)
    tmp.unlink(missing_ok=True)
    state = memory.StateFile(tmp)
    try:
        t0 = time.monotonic()
        if prefill > 0:
            await memory.run_to_end(state.prefill, prefill)
        prefill_ms = (time.monotonic() - t0) * 1000
        outcome = await _save(qmp, state, at_stop, resume, limit_s, passes)
        outcome.stream_bytes = await memory.run_to_end(state.finish)  # a prefill's unused tail goes
    finally:
        state.close()
    outcome.prefill_ms = prefill_ms
    return outcome


async def _save(
    qmp: QMP,
    state: memory.StateFile,
    at_stop: Callable[[], Awaitable[None]] | None,
    resume: Callable[[], bool] | None,
    limit_s: float,
    passes: int,
) -> Outcome:
    await qmp.migrate_set_capabilities({"x-ignore-shared": False, "pause-before-switchover": True, "events": True})
    await qmp.migrate_set_parameters({"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH})
    running = await qmp.status() == "running"
    live = running and limit_s > 0  # the guest runs during the copy (until QEMU or we stop it)
    fallback = "stop-and-copy asked for" if running and not live else None
    stopped_at = None if running else time.time()
    seen, completed_at, start_pause_ms = 0, 0.0, 0.0
    with qmp.listen("MIGRATION", "MIGRATION_PASS", "STOP") as events:
        t0, t0_wall = time.monotonic(), time.time()
        try:
            # Stopped across the migration's start: QEMU starts its dirty log and flushes the
            # vCPUs' TLBs (TCG tracks writes through them) as queued work that a running vCPU
            # takes up only at its next exit; its stores meanwhile marked nothing dirty.
            await qmp.stop()
            await qmp.migrate_to_fd(state.fd)
            iterating = None  # when the first pass over all of RAM ended (stopping sooner saves nothing)
            started_paused = live
            while True:  # until the switch-over
                end = t0 + MIGRATE_TIMEOUT if iterating is None or not live else iterating + limit_s
                event = await _next(events, end - time.monotonic())
                if event is None and live and iterating is not None:
                    live, fallback = False, f"not converged in {limit_s:g} s after the first pass ({seen} passes)"
                    await qmp.stop()
                    continue
                if event is None:
                    raise EngineError(f"the memory state migration did not finish in {MIGRATE_TIMEOUT:g} s")
                name, data = event.get("event"), event.get("data") or {}
                if name == "STOP" and not started_paused:
                    stopped_at = _stamp(event)
                elif name == "MIGRATION_PASS":
                    seen = int(data.get("pass", seen))
                    if started_paused and resume is not None and not resume():  # a client paused it meanwhile
                        started_paused, live, fallback, stopped_at = False, False, "paused by a client", t0_wall
                    if started_paused:  # the dirty log is on: the guest runs during the copy
                        started_paused = False
                        try:
                            await qmp.cont()
                            start_pause_ms = (time.monotonic() - t0) * 1000
                        except QMPCommandError:  # too late: QEMU converged at once and holds it for the switch-over
                            if await qmp.status() != "finish-migrate":
                                raise
                            stopped_at = t0_wall
                    if seen >= 2 and iterating is None:  # pass 1 is the sync before the first pass
                        iterating = time.monotonic()
                    if seen > passes and live:
                        live, fallback = False, f"not converged in {passes} passes"
                        await qmp.stop()
                elif data.get("status") == "pre-switchover":
                    break
                else:
                    await _check(qmp, data.get("status"))
            t_stop = time.monotonic()
            if at_stop is not None:
                await at_stop()
            await qmp.migrate_continue("pre-switchover")
            while (event := await _next(events, t0 + MIGRATE_TIMEOUT - time.monotonic())) is not None:
                status = (event.get("data") or {}).get("status") if event.get("event") == "MIGRATION" else None
                if status == "completed":
                    completed_at = _stamp(event)
                    break
                await _check(qmp, status)
            else:
                raise EngineError(f"the memory state migration did not finish in {MIGRATE_TIMEOUT:g} s")
            await memory.settled(qmp)
            if running and resume is not None and resume():
                await qmp.cont()  # also reactivates the block devices QEMU inactivated at completion
            t_end = time.time()
        except BaseException:
            await _cancel(qmp)
            raise
    info = await qmp.query_migrate()
    if fallback is not None:
        log.info("memory state: the guest was stopped before the pre-copy converged (%s)", fallback)
    # QEMU sends STOP once the vCPUs are paused and its stop handlers ran; its ``downtime``
    # counts from just before (up to completion): the earlier of the two is the pause's start.
    downtime = info.get("downtime")
    stopped_at = stopped_at or completed_at  # a STOP event precedes the switch-over; not seen: QEMU's bug
    if isinstance(downtime, int) and fallback is None:
        stopped_at = min(stopped_at, completed_at - downtime / 1000)
    return Outcome(
        pause_ms=(t_end - stopped_at) * 1000,
        precopy_ms=(t_stop - t0) * 1000,
        state_ms=(time.monotonic() - t0) * 1000,
        passes=seen,
        fallback=fallback,
        ram_bytes=int((info.get("ram") or {}).get("transferred", 0)),
        downtime_ms=float(downtime) if isinstance(downtime, int) else 0.0,
        tail_ms=(t_end - completed_at) * 1000,
        start_pause_ms=start_pause_ms,
    )


async def _next(events: Events, timeout: float) -> dict[str, Any] | None:
    """The next event, or None once ``timeout`` (s) has passed."""
    try:
        return await events.next(max(timeout, 0.0))
    except TimeoutError:
        return None


async def _check(qmp: QMP, status: object) -> None:
    """Raise if the migration ended without completing (QEMU's reason in the message)."""
    if status in ("failed", "cancelled"):
        info = await qmp.query_migrate()
        raise EngineError(f"saving the memory state failed: {without_paths(str(info.get('error-desc', status)))}")


def _stamp(event: dict[str, Any]) -> float:
    """QEMU's timestamp of an event (host wall clock), as time.time()."""
    ts = event.get("timestamp") or {}
    try:
        return int(ts["seconds"]) + int(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return time.time()


async def _cancel(qmp: QMP) -> None:
    """Cancel a migration left running or paused (the caller decides whether to ``cont``)."""
    try:
        await qmp.migrate_cancel()
    except EngineError as exc:
        log.warning("cancelling the memory state migration failed: %s", exc)
