"""Suspend and resume on the local backend (the host side of ``engine/memory``), and the
memory state files of memory snapshots.

``suspend()`` asks the box's supervisor to save the memory and device state and let QEMU
exit; the supervisor records ``suspended`` when QEMU is gone. ``start()`` of a suspended
box checks the saved state (:func:`resumable`) and starts QEMU with ``-incoming``; the
supervisor loads the state, reseeds the guest's RNG, re-identifies a fork (a clone of a
memory snapshot, a warm start from a template), steps the guest's wall clock and answers
ready. A saved state that fails its check is discarded and the box is left ``stopped`` (it
boots cold from its disk).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

from boxvm.engine import memory, qemucaps
from boxvm.errors import InvalidState, StorageError
from boxvm.options import BoxInfo, BoxOptions
from boxvm.processes import alive
from boxvm.state.boxes import Boxes
from boxvm.status import RULES, BoxStatus, Operation, require
from boxvm.store import BoxRecord, Store


def shape(rec: BoxRecord) -> dict[str, Any]:
    """What a saved memory state must match to be loaded into this box's next QEMU."""
    opts = BoxOptions.from_dict(rec.options)
    return {"memory_mib": opts.memory_mib, "cpus": opts.cpus, "guest_bundle": rec.guest_bundle}


def resumable(store: Store, box_dir: Path, rec: BoxRecord) -> bool:
    """True if this start resumes the saved state. A suspended box whose state fails its
    check is moved to ``stopped`` (its disk is intact) and StorageError says so."""
    if rec.status != BoxStatus.SUSPENDED:
        return False
    try:
        memory.check(box_dir, shape(rec))
    except StorageError as exc:
        if store.transition(rec.id, BoxStatus.STOPPED, {BoxStatus.SUSPENDED}):
            memory.discard(box_dir)
        raise StorageError(
            f"box {rec.name!r} cannot resume: {exc.message}. Its memory state was discarded and the box is"
            " stopped with its disk intact: start it again to boot it cold"
        ) from exc
    return True


def resume_plan(box_dir: Path, rec: BoxRecord) -> tuple[Path, bool, dict[str, Any]]:
    """For a start that resumes (``resumable`` said so): the RAM file QEMU maps, whether it
    maps it shared, and the supervisor's plan (``engine/memory_ops``). A ``stream`` state is
    loaded into a fresh RAM file; a fork maps ``memory.BASE`` privately and is re-identified
    (hostname and machine-id of this box) before it is ready."""
    meta = memory.read_meta(box_dir)
    ram = meta.get("ram", "file")
    plan: dict[str, Any] = {"with_ram": ram == "stream", "private": ram == "base"}
    if meta.get("fork"):
        plan["identity"] = {"hostname": rec.name[:64], "machine_id": rec.id}
    if ram == "stream":
        memory.blank_ram(box_dir, BoxOptions.from_dict(rec.options).memory_mib)
    if ram == "base":
        return box_dir / memory.BASE, False, plan
    return box_dir / memory.RAM, True, plan


def fork_into(box_dir: Path, snapshot_id: str, dirs: list[Path]) -> None:
    """Give each new box directory the memory snapshot's state as a fork's (``engine/memory``)."""
    for work in dirs:
        memory.fork_into(snapshot_dir(box_dir, snapshot_id), work)


class Suspend:
    """``suspend`` of the local backend."""

    def __init__(self, boxes: Boxes) -> None:
        self.boxes = boxes
        self.store = boxes.store

    async def suspend(self, box_id: str) -> BoxInfo:
        t0 = time.monotonic()
        rec = self.boxes.record(box_id)
        rule = require(Operation.SUSPEND, rec.name, rec.status, rec.operation)
        assert rule.holds is not None
        qemucaps.require_memory_state(self.boxes.home.cache, f"suspend box {rec.name!r}")
        if not self.store.transition(rec.id, rule.holds, {rec.status}):
            raise InvalidState(f"box {rec.name!r} changed status while suspending: try again")
        conns = self.boxes.ctx.conns
        try:
            conn = await conns.get(rec.id, rec.name)
            result = await conn.request("suspend", shape=shape(rec))
        except BaseException:
            # Saving failed and the supervisor let the VM run on; if it is gone, the
            # record says failed (the next start boots cold).
            self.store.transition(rec.id, rec.status, {BoxStatus.SUSPENDING})
            self.boxes.record(rec.id)
            raise
        await conns.drop(rec.id)
        deadline = time.monotonic() + 10  # the supervisor exits right after QEMU
        while rec.supervisor_pid and alive(rec.supervisor_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        timings = {f"suspend_{k}": float(v) for k, v in result.items() if k.endswith("_ms")}
        self.store.add_timing(rec.id, suspend_ms=(time.monotonic() - t0) * 1000, **timings)
        return self.boxes.info(self.boxes.record(rec.id))


# -- memory snapshots (their files live in the box directory, removed with the box) --------
def snapshot_dir(box_dir: Path, snapshot_id: str) -> Path:
    return box_dir / memory.SNAPSHOTS / snapshot_id


def capture_saved(box_dir: Path, rec: BoxRecord) -> None:
    """A suspended box's saved state, checked, copied to ``memory.CAPTURE`` for a memory
    snapshot (the box keeps its own: it stays suspended)."""
    try:
        memory.check(box_dir, shape(rec))
    except StorageError as exc:
        raise StorageError(f"box {rec.name!r} cannot be snapshotted with its memory: {exc.message}") from exc
    try:
        memory.copy_saved(box_dir, box_dir / memory.CAPTURE)
    except OSError as exc:
        raise StorageError(f"could not copy the memory of box {rec.name!r}: {exc.strerror or exc}") from exc


def drop_capture(box_dir: Path) -> None:
    shutil.rmtree(box_dir / memory.CAPTURE, ignore_errors=True)


def keep_capture(box_dir: Path, snapshot_id: str) -> None:
    """Give the supervisor's finished capture (``memory.CAPTURE``) to the snapshot."""
    dest = snapshot_dir(box_dir, snapshot_id)
    dest.parent.mkdir(mode=0o700, exist_ok=True)
    os.rename(box_dir / memory.CAPTURE, dest)


def drop_snapshot(box_dir: Path, snapshot_id: str) -> None:
    shutil.rmtree(snapshot_dir(box_dir, snapshot_id), ignore_errors=True)


def restore_into(store: Store, box_dir: Path, rec: BoxRecord, snapshot_id: str) -> None:
    """After a memory snapshot's disk is restored: its memory becomes the box's saved
    state (RAM copied sparsely, the record last) and the box is ``suspended``."""
    src = snapshot_dir(box_dir, snapshot_id)
    try:
        memory.check(src, shape(rec))
    except StorageError as exc:
        raise StorageError(
            f"the memory state of this snapshot of box {rec.name!r} cannot be used: {exc.message}. Its disk was"
            " restored and the box is stopped: start it to boot it cold"
        ) from exc
    memory.discard(box_dir)
    if memory.read_meta(src).get("ram", "file") == "file":  # a fork's snapshot holds its RAM in the state
        memory.sparse_copy(src / memory.RAM, box_dir / memory.RAM)
    shutil.copyfile(src / memory.STATE, box_dir / memory.STATE)
    shutil.copyfile(src / memory.META, box_dir / memory.META)  # last: it vouches for the others
    store.transition(rec.id, BoxStatus.SUSPENDED, RULES[Operation.RESTORE].allowed, during_operation=True)
