"""Captures and snapshots: create, list, restore, remove.

The layer-store steps are O(1) metadata writes of well under a millisecond, so they run
inline: a thread hop would cost more than the work. Each operation claims the box in the
store first (``Boxes.claim``) or in its first transaction, so a second state operation or
a start/stop from any process fails at once with InvalidState. File changes follow the
layer store's write-then-rename discipline and the metadata commit comes last;
``boxvm.faults`` names the points between steps that the fault-injection tests crash at.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass

from boxvm import faults
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP
from boxvm.engine import qemucaps
from boxvm.engine.memory import run_to_end
from boxvm.errors import AlreadyExists, SnapshotNotFound
from boxvm.options import BoxInfo, SnapshotInfo, SnapshotOptions, check_snapshot_name
from boxvm.state import memory as box_memory
from boxvm.state.boxes import Boxes
from boxvm.status import LIVE, RULES, BoxStatus, Operation, require
from boxvm.store import BoxRecord, SnapshotRecord


@dataclass(frozen=True)
class Capture:
    layer: str
    parent: str | None  # the layer the captured top backed onto
    consistency: str
    timings: dict[str, float]
    node: str | None  # the running VM's block node for the layer (None: captured at rest)

    @property
    def at_rest(self) -> bool:
        """Captured at rest: the box's new top is an empty overlay (recorded as fresh)."""
        return self.consistency == "stopped"


class Snapshots:
    def __init__(self, boxes: Boxes) -> None:
        self.boxes = boxes
        self.ctx, self.home, self.store, self.layers = boxes.ctx, boxes.home, boxes.store, boxes.layers

    async def capture(self, rec: BoxRecord, options: SnapshotOptions) -> Capture:
        """Make the box's current disk state an immutable layer (the caller, holding the
        claim, records it)."""
        box_dir = self.home.box_dir(rec.id)
        t0 = time.perf_counter()
        if rec.status in (BoxStatus.RUNNING, BoxStatus.PAUSED):
            # The supervisor owns the capture (prepare, switch, publish, record): a client
            # that dies meanwhile leaves nothing half done.
            conn = await self.ctx.conns.get(rec.id, rec.name)
            self.boxes.sync_layer(rec.id)
            result = await conn.request(
                "capture_memory" if options.memory else "capture",
                shape=box_memory.shape(rec),
                quiesce=options.quiesce,
                quiesce_timeout=options.quiesce_timeout_secs,
                stop_on_quiesce_fail=options.stop_on_quiesce_fail,
            )
            timings = {k: round(result[k], 2) for k in ("pause_ms", "switch_ms", "host_window_ms")}
            layer, parent, consistency, node = result["layer"], result["parent"], result["consistency"], result["node"]
        else:
            self.boxes.sync_layer(rec.id)  # files a crash left ahead of (or behind) the record
            layer, parent = self.layers.prepare_capture(box_dir)
            faults.point("capture:pending-written")
            self.layers.commit(box_dir, sync=False)
            timings, consistency, node = {"pause_ms": 0.0}, "stopped", None
        timings["capture_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        faults.point("capture:committed")
        return Capture(layer, parent, consistency, timings, node)

    async def create(self, box_id: str, name: str, options: SnapshotOptions) -> SnapshotInfo:
        check_snapshot_name(name)
        options.validate()
        rec = self.boxes.record(box_id)
        operation = Operation.MEMORY_SNAPSHOT if options.memory else Operation.SNAPSHOT
        if options.memory:
            require(operation, rec.name, rec.status, rec.operation)
            qemucaps.require_memory_state(self.home.cache, f"take a memory snapshot of box {rec.name!r}")
        if self.store.get_snapshot(rec.id, name) is not None:
            raise AlreadyExists(f"box {rec.name!r} already has a snapshot named {name!r}: choose another name")
        if not options.memory:
            snap = SnapshotRecord(secrets.token_hex(8), rec.id, name, rec.layer or "", "stopped")
            if self.capture_fresh(rec, snap):
                return self.info(snap)
        async with self.boxes.claim(rec, operation) as claim:
            saved = options.memory and rec.status == BoxStatus.SUSPENDED  # its saved state, beside its disk at rest
            try:
                if saved:  # to its end even if cancelled: the claim must outlive the copy
                    await run_to_end(box_memory.capture_saved, self.home.box_dir(rec.id), rec)
                cap = await self.capture(rec, options)
            except BaseException:
                if saved:
                    box_memory.drop_capture(self.home.box_dir(rec.id))
                raise
            snap = SnapshotRecord(secrets.token_hex(8), rec.id, name, cap.layer, cap.consistency, timings=cap.timings)
            if options.memory:
                snap.has_memory = True
                box_memory.keep_capture(self.home.box_dir(rec.id), snap.id)
            try:
                self.store.record_capture(rec.id, cap.layer, cap.parent, snapshot=snap, release=True, fresh=cap.at_rest)
                claim.ended = True
            except AlreadyExists:  # the name was taken meanwhile: the capture stays the box's
                box_memory.drop_snapshot(self.home.box_dir(rec.id), snap.id)
                self.store.record_capture(rec.id, cap.layer, cap.parent, fresh=cap.at_rest)
                raise
            except BaseException:  # no record names the state renamed for it
                if snap.has_memory:
                    box_memory.drop_snapshot(self.home.box_dir(rec.id), snap.id)
                raise
        return self.info(snap)

    def capture_fresh(self, rec: BoxRecord, snap: SnapshotRecord) -> bool:
        """A capture with no file change, if the box is at rest with a fresh top (an empty
        overlay over its record's layer, checked by one header read here and the record in
        the transaction): the captured state is that layer itself, which the snapshot
        holds. One transaction, no claim; False if the box does not qualify (the caller
        captures the long way)."""
        allowed = RULES[Operation.SNAPSHOT].allowed - LIVE  # (a live box's top is never fresh)
        if not rec.fresh or rec.layer is None or rec.status not in allowed:
            return False
        quiet = self.layers.quiet_top(self.home.box_dir(rec.id))
        if quiet is None or quiet[1] != rec.layer:
            return False
        snap.layer = rec.layer
        snap.timings = {"pause_ms": 0.0, "capture_ms": 0.0}
        return self.store.capture_fresh(rec.id, allowed, rec.layer, snap)

    def find(self, box_id: str, name: str) -> tuple[BoxRecord, SnapshotRecord]:
        rec = self.boxes.record(box_id)
        snap = self.store.get_snapshot(rec.id, name)
        if snap is None:
            raise SnapshotNotFound(
                f"box {rec.name!r} has no snapshot named {name!r}: `boxvm snapshot ls {rec.name}` lists them"
            )
        return rec, snap

    def info(self, snap: SnapshotRecord) -> SnapshotInfo:
        chain = self.layers.chain_of(None, self.store.layer_chain(snap.layer))  # from the store, O(1) reads
        path = chain[0] if chain else self.layers.layer_path(snap.layer)
        return SnapshotInfo(
            id=snap.id,
            name=snap.name,
            box_id=snap.box_id,
            created_at=snap.created_at,
            size_bytes=qcow2.allocated_bytes(path),
            container_disk_bytes=sum(qcow2.allocated_bytes(p) for p in chain),
            guest_disk_bytes=0,
            consistency=snap.consistency,
            has_memory=snap.has_memory,
            timings=dict(snap.timings),
        )

    async def of_box(self, box_id: str) -> list[SnapshotInfo]:
        rec = self.boxes.record(box_id)
        return [self.info(s) for s in self.store.list_snapshots(rec.id)]

    async def get(self, box_id: str, name: str) -> SnapshotInfo | None:
        rec = self.boxes.record(box_id)
        snap = self.store.get_snapshot(rec.id, name)
        return self.info(snap) if snap else None

    async def restore(self, box_id: str, name: str) -> BoxInfo:
        # At rest with a fresh top: one transaction that reads the record, moves it and
        # re-points the top in place (a memory snapshot takes the long way: the box resumes
        # from it). By a name, or a box that does not qualify: the long way.
        done = self.store.restore_fresh(box_id, name, RULES[Operation.RESTORE].allowed, self._repoint)
        if done is not None:
            faults.point("restore:committed")
            self.layers.collect(self.store, done[2])  # (the box directory did not change)
            return self.boxes.info(done[0])
        rec, snap = self.find(box_id, name)
        t0 = time.perf_counter()
        box_dir = self.home.box_dir(rec.id)
        # The record moves first (holding the snapshot's layer, found in the same
        # transaction); the files follow; recovery finishes a restore cut in between. A box
        # whose files agree with its record is claimed in that same transaction.
        quiet = self.layers.quiet_top(box_dir)
        restored = None
        if quiet is not None:
            claim = (RULES[Operation.RESTORE].allowed, os.getpid(), quiet[1])
            restored = self.store.restore_layer(rec.id, snap.name, claim)
        async with self.boxes.claim(rec, Operation.RESTORE, held=restored is not None) as claim:
            if restored is None or quiet is None:
                self.layers.commit(box_dir)  # a crashed one first
                self.boxes.sync_layer(rec.id)
                size = qcow2.read_header(box_dir / TOP).size
                restored = self.store.restore_layer(rec.id, snap.name)
                if restored is None:
                    raise SnapshotNotFound(f"snapshot {name!r} of box {rec.name!r} was removed meanwhile")
            else:
                size = quiet[0]
            faults.point("restore:recorded")
            self.layers.restore(box_dir, snap.layer, size)
            faults.point("restore:committed")
            self.layers.collect(self.store, restored[1], synced=[box_dir])
            if snap.has_memory:  # the box resumes from it: suspended
                await asyncio.to_thread(box_memory.restore_into, self.store, box_dir, rec, snap.id)
            claim.timings["restore_ms"] = (time.perf_counter() - t0) * 1000
        return self.boxes.info(self.boxes.record(rec.id))

    def _repoint(self, rec: BoxRecord, snap: SnapshotRecord) -> bool:
        """A fresh box's top re-pointed at the snapshot's layer, in place (see ``restore``)."""
        assert rec.layer is not None
        return not snap.has_memory and self.layers.repoint(self.home.box_dir(rec.id), rec.layer, snap.layer)

    async def remove(self, box_id: str, name: str) -> None:
        rec, snap = self.find(box_id, name)
        dead = self.store.remove_snapshot(snap.id)  # the name and its reference go at once
        faults.point("snapshot-remove:row-deleted")
        self.layers.collect(self.store, dead)
        box_memory.drop_snapshot(self.home.box_dir(rec.id), snap.id)
