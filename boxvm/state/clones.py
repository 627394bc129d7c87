"""Clones of a box (from its current state, through a capture) or of one of its snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from boxvm import faults
from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP, fsync_files
from boxvm.engine import qemu
from boxvm.errors import InvalidArgument, NotFound, StorageError
from boxvm.guest import bundle as bundle_mod
from boxvm.options import CloneOptions, check_name
from boxvm.state.memory import fork_into
from boxvm.state.snapshots import Snapshots
from boxvm.status import LIVE, RULES, BoxStatus, Operation
from boxvm.store import BoxRecord
from boxvm.store.db import FRESH_BOTH, SourceMoved

FORK_NEEDS_MEMORY = (
    "start_after_clone resumes the clones from a memory snapshot: name one in from_snapshot"
    " (snapshot.create(name, SnapshotOptions(memory=True))), or start the clones yourself"
)


class Clones:
    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self.boxes = snapshots.boxes
        self.home, self.store, self.layers = snapshots.home, snapshots.store, snapshots.layers

    async def clone(self, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxRecord]:
        """Clone a box (or one of its snapshots) ``len(names)`` times from one capture;
        all the clones' records are committed at once."""
        if not names:
            raise InvalidArgument("clone needs at least one name (or None for a generated one)")
        rec = self.boxes.record(box_id)
        ids = [secrets.token_hex(16) for _ in names]
        final_names = [
            check_name(n) if n is not None else f"{rec.name[:100]}-{i[:8]}" for n, i in zip(names, ids, strict=True)
        ]
        if len(set(final_names)) != len(final_names):
            raise InvalidArgument("clone names must be distinct")
        for n in final_names:
            self.boxes.check_free(n)
        if options.start_after_clone and options.from_snapshot is None:
            raise InvalidArgument(FORK_NEEDS_MEMORY)
        try:
            return await self._clone(rec, ids, final_names, options, fast=True)
        except SourceMoved:  # restored, started or claimed since its top was read: read it again
            return await self._clone(self.boxes.record(rec.id), ids, final_names, options, fast=False)

    async def _clone(
        self, rec: BoxRecord, ids: list[str], final_names: list[str], options: CloneOptions, fast: bool
    ) -> list[BoxRecord]:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        forked_from: str | None = None  # the memory snapshot the clones resume from
        pin: str | None = None  # holds the layer while the clones are staged
        source = None  # or: the source box holds it, checked in the clones' transaction
        size = None
        allowed = RULES[Operation.CLONE].allowed - LIVE  # (a live box's top is never fresh)
        quiet = None
        if options.from_snapshot is None and fast and rec.fresh and rec.layer is not None and rec.status in allowed:
            quiet = self.layers.quiet_top(self.home.box_dir(rec.id))
        if options.from_snapshot is not None:
            # No claim on the box: the snapshot's layer is pinned in the transaction that
            # finds the snapshot, so removing either meanwhile cannot collect it.
            pinned = self.store.pin_snapshot(rec.id, options.from_snapshot, os.getpid())
            if pinned is None:
                self.snapshots.find(rec.id, options.from_snapshot)  # raises NotFound
                raise NotFound(f"box {rec.name!r} (or its snapshot) was removed while it was being cloned")
            layer, pin = pinned[0].layer, pinned[1]
            if options.start_after_clone:
                if not pinned[0].has_memory:
                    self.layers.collect(self.store, self.store.unpin(pin))
                    raise InvalidArgument(FORK_NEEDS_MEMORY)
                forked_from = pinned[0].id
        elif rec.layer is not None and quiet is not None and quiet[1] == rec.layer:
            # At rest with a fresh top: its layer is its state. No pin and no transaction
            # here: the clones' own transaction checks the box still holds the layer.
            layer, size, source = rec.layer, quiet[0], (rec.id, allowed, rec.layer)
        else:
            async with self.boxes.claim(rec, Operation.CLONE) as claim:
                cap = await self.snapshots.capture(rec, options.snapshot.validate())
                pin = self.store.record_capture(
                    rec.id, cap.layer, cap.parent, pin_pid=os.getpid(), release=True, fresh=cap.at_rest
                )
                assert pin is not None
                claim.ended = True
                layer, timings = cap.layer, cap.timings
        try:
            # No removal of its image until the clones' records exist: a clone of a snapshot
            # of a removed box has no other hold on the base disk its layers rest on.
            async with self._image_held(rec):
                with self.boxes.staging(ids, "clone") as stage:
                    if options.cow:
                        self._write(rec, layer, stage.dirs, True, size, guest=forked_from is not None)
                    else:  # a full copy of the chain: scales with the data
                        await asyncio.to_thread(self._write, rec, layer, stage.dirs, False, size)
                    if forked_from is not None:  # the clones resume from it: forks
                        await asyncio.to_thread(fork_into, self.home.box_dir(rec.id), forked_from, stage.dirs)
                    faults.point("clone:staged")
                    own_timings = {"clone_ms": round((time.perf_counter() - t0) * 1000, 2)}
                    if "pause_ms" in timings:
                        own_timings["pause_ms"] = timings["pause_ms"]
                    records = [
                        _clone_record(rec, new_id, name, own_timings, layer if options.cow else None)
                        for new_id, name in zip(ids, final_names, strict=True)
                    ]
                    if forked_from is not None:
                        for r in records:
                            r.status = BoxStatus.SUSPENDED
                    # all clones appear at once; copy-on-write clones (not forks) hold only fresh tops
                    stage.publish(
                        lambda: self.store.insert_clones(records, pin, source),
                        sync=forked_from is not None or not options.cow,
                    )
        except BaseException as exc:
            if pin is not None:
                self.layers.collect(self.store, self.store.unpin(pin))
            # A clone from a snapshot holds the layer, not the box: the source's own files
            # (its guest-root overlay, a memory snapshot's state) go with a concurrent remove.
            if isinstance(exc, FileNotFoundError) and self.store.get_box(rec.id) is None:
                raise NotFound(f"box {rec.name!r} was removed while it was being cloned") from None
            raise
        return records

    @contextlib.asynccontextmanager
    async def _image_held(self, rec: BoxRecord) -> AsyncIterator[None]:
        """``ImageStore.in_use`` of the source's image, if this home has it (an imported
        box's disks rest on no image)."""
        if rec.image_digest is None or self.store.get_image(rec.image_digest) is None:
            yield
        else:
            async with self.boxes.ctx.images.in_use(rec.image_digest):
                yield

    def _write(
        self, src: BoxRecord, layer: str, dirs: list[Path], cow: bool, size: int | None, guest: bool = True
    ) -> None:
        """Each clone's disks, in its staging directory. Copy-on-write clones get fresh tops
        (empty overlays, recorded as such, regenerable: not synced); a full copy holds data
        and is made durable (``qemu-img convert`` does not sync). ``size``: the disk's
        virtual size if known (the source's top was just read), else read from the layer.
        ``guest=False`` (a copy-on-write clone, not a fork): no guest top; like any fresh
        guest top it is made before the first boot (``Boxes.renew_fresh``), and nothing
        reads it before -- one file fewer, and a file's creation is most of a clone's time."""
        if size is None:
            size = qcow2.read_header(self.layers.layer_path(layer)).size
        if not cow:  # its bytes are copied: from the files the store records, no others
            self.layers.verify_chain(self.layers.layer_path(layer), self.store.layer_chain(layer)[1:])
        bundle = bundle_mod.find(self.home, src.guest_bundle) if guest or not cow else None
        if bundle is None and (guest or not cow):
            raise StorageError(f"the guest bundle of box {src.name!r} is gone: run `boxvm setup`")
        for work in dirs:
            if cow:
                self.layers.new_top(work, layer, size, sync=False)
            else:
                qcow2.flatten(self.layers.layer_path(layer), work / TOP)
            if bundle is not None:
                self.layers.new_guest_top(work, bundle.rootfs, sync=False)
        if not cow:
            fsync_files([work / name for work in dirs for name in (TOP, GUEST_TOP)])


def _clone_record(src: BoxRecord, box_id: str, name: str, timings: dict[str, float], layer: str | None) -> BoxRecord:
    return BoxRecord(
        id=box_id,
        name=name,
        status=BoxStatus.STOPPED if src.status != BoxStatus.CONFIGURED else BoxStatus.CONFIGURED,
        image=src.image,
        image_digest=src.image_digest,
        options={k: v for k, v in src.options.items() if k not in ("migration", "lease")},  # the source's marks
        mac=qemu.new_mac(),
        guest_bundle=src.guest_bundle,
        timings=dict(timings),
        layer=layer,
        fresh=FRESH_BOTH if layer is not None else 0,  # copy-on-write: both its tops are empty overlays
    )
