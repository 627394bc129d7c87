"""Snapshot, restore and clone for the local backend, on the layer store.

The layer-store steps are O(1) metadata writes of well under a millisecond, so they run
inline: a thread hop would cost more than the work. Only what scales with data (a full
copy for ``cow=False``) or with the number of layers (garbage collection) runs in a thread.

Each operation claims the box in the store first (``snapshotting``, ``restoring``,
``cloning``), so a second state operation or a start/stop from any process fails at
once with InvalidState. File changes follow the layer store's write-then-rename
discipline and the metadata commit comes last; ``boxvm.faults`` names the points
between steps that the fault-injection tests crash at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from boxvm import archive, faults
from boxvm.backends import memory as box_memory
from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP, Scan, layer_of
from boxvm.engine import qemu
from boxvm.errors import (
    AlreadyExists,
    ArchiveError,
    EngineError,
    InvalidArgument,
    InvalidState,
    NotFound,
    SnapshotNotFound,
)
from boxvm.options import (
    NAME_RE,
    BoxInfo,
    BoxOptions,
    CloneOptions,
    DiskUsage,
    ExportOptions,
    SnapshotInfo,
    SnapshotOptions,
    check_name,
    check_snapshot_name,
)
from boxvm.processes import alive as _pid_alive
from boxvm.status import RULES, BoxStatus, Operation, require
from boxvm.store import BoxRecord, SnapshotRecord
from boxvm.streams import ByteStream, ThreadReader, produced, pump

if TYPE_CHECKING:
    from boxvm.backends.local import LocalBackend

OWNER = ".owner"
log = logging.getLogger("boxvm")


@dataclass(frozen=True)
class Capture:
    layer: str
    parent: str | None  # the layer the captured top backed onto
    consistency: str
    timings: dict[str, float]
    node: str | None  # the running VM's block node for the layer (None: captured at rest)


@dataclass
class Claim:
    ended: bool = False  # the operation's last transaction ended it (one transaction fewer)
    timings: dict[str, float] = field(default_factory=dict)  # recorded when the claim ends


def mark_owner(directory: Path) -> None:
    """Claim a directory until its record is committed (recovery leaves it alone)."""
    (directory / OWNER).write_text(str(os.getpid()))


class StateOps:
    """Mixed into LocalBackend (it provides ``home``, ``store``, ``layers`` and helpers)."""

    @contextlib.asynccontextmanager
    async def _claim(
        self: LocalBackend,
        rec: BoxRecord,
        operation: Operation,
        held: bool = False,
    ) -> AsyncIterator[Claim]:
        """Hold the box for a state operation (its rule's transient status, allowed from its
        rule's statuses); ``held``: the operation's first transaction claimed it already (a
        box at rest whose files agree with its record)."""
        rule = RULES[operation]
        assert rule.holds is not None
        if not held and not self.store.begin_operation(rec.id, rule.holds, rule.allowed, os.getpid()):
            now = self._record(rec.id)
            require(operation, rec.name, now.status, now.operation)
            raise InvalidState(f"cannot {rule.verb} box {rec.name!r}: its status changed meanwhile; try again")
        claim = Claim()
        try:
            yield claim
        finally:
            if not claim.ended:
                self.store.end_operation(rec.id, claim.timings)

    def _sync_layer(self: LocalBackend, box_id: str) -> None:
        """Make the box's record name the layer its top backs onto (one header read), for
        what a crash left between files and record. Only with the box claimed.

        A layer no row knows whose parent is the recorded one is a capture whose record
        was lost: it is recorded. A layer that has a row wins over the record (a capture
        folded back, a restore that never reached its files). Otherwise the top backs
        onto a layer already released (a restore whose record committed): the restore is
        finished, at rest; a running box's supervisor owns its top and it is left."""
        rec = self.store.get_box(box_id)
        box_dir = self.home.box_dir(box_id)
        if rec is None:
            return
        try:
            actual = layer_of(box_dir / TOP)
        except (OSError, ValueError):
            return  # no readable top: nothing to agree with (the consistency scan reports it)
        if actual == rec.layer:
            return
        if actual is not None and not self.store.has_layer(actual):
            path = self.layers.layer_path(actual)
            try:
                parent = layer_of(path)
            except (OSError, ValueError):
                parent = actual  # unreadable or gone: not a capture of this box
            if parent == rec.layer and self.store.adopt_capture(box_id, actual, parent, path.exists):
                log.warning("box %s: recorded a capture its process did not record", rec.name)
                return
        if actual is None or self.store.has_layer(actual):
            log.warning("box %s: its record follows its disk (layer %s)", rec.name, actual)
            self.layers.collect(self.store, self.store.set_box_layer(box_id, actual), synced=[box_dir])
        elif not rec.status.is_live and rec.layer is not None:
            log.warning("box %s: finishing an interrupted restore", rec.name)
            self.layers.restore(box_dir, rec.layer, qcow2.read_header(box_dir / TOP).size)

    async def _capture(self: LocalBackend, rec: BoxRecord, options: SnapshotOptions) -> Capture:
        """Make the box's current disk state an immutable layer (the caller records it)."""
        box_dir = self.home.box_dir(rec.id)
        t0 = time.perf_counter()
        if rec.status in (BoxStatus.RUNNING, BoxStatus.PAUSED):
            # The supervisor owns the capture (prepare, switch, publish, record): a client
            # that dies meanwhile leaves nothing half done.
            conn = await self._conn(rec.id, rec.name)
            self._sync_layer(rec.id)
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
            layer, parent = self.layers.prepare_capture(box_dir)
            faults.point("capture:pending-written")
            self.layers.commit(box_dir, sync=False)
            timings, consistency, node = {"pause_ms": 0.0}, "stopped", None
        timings["capture_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        faults.point("capture:committed")
        return Capture(layer, parent, consistency, timings, node)

    # -- snapshots --------------------------------------------------------------------
    async def snapshot_create(self: LocalBackend, box_id: str, name: str, options: SnapshotOptions) -> SnapshotInfo:
        check_snapshot_name(name)
        options.validate()
        rec = self._record(box_id)
        operation = Operation.MEMORY_SNAPSHOT if options.memory else Operation.SNAPSHOT
        if options.memory:
            require(operation, rec.name, rec.status, rec.operation)
        if self.store.get_snapshot(rec.id, name) is not None:
            raise AlreadyExists(f"box {rec.name!r} already has a snapshot named {name!r}: choose another name")
        async with self._claim(rec, operation) as claim:
            cap = await self._capture(rec, options)
            snap = SnapshotRecord(secrets.token_hex(8), rec.id, name, cap.layer, cap.consistency, timings=cap.timings)
            if options.memory:
                snap.has_memory = True
                box_memory.keep_capture(self.home.box_dir(rec.id), snap.id)
            try:
                self.store.record_capture(rec.id, cap.layer, cap.parent, snapshot=snap, release=True)
                claim.ended = True
            except AlreadyExists:  # the name was taken meanwhile: the capture stays the box's
                box_memory.drop_snapshot(self.home.box_dir(rec.id), snap.id)
                self.store.record_capture(rec.id, cap.layer, cap.parent)
                raise
        return self._snapshot_info(snap)

    def _snapshot(self: LocalBackend, box_id: str, name: str) -> tuple[BoxRecord, SnapshotRecord]:
        rec = self._record(box_id)
        snap = self.store.get_snapshot(rec.id, name)
        if snap is None:
            raise SnapshotNotFound(
                f"box {rec.name!r} has no snapshot named {name!r}: `boxvm snapshot ls {rec.name}` lists them"
            )
        return rec, snap

    def _snapshot_info(self: LocalBackend, snap: SnapshotRecord) -> SnapshotInfo:
        path = self.layers.layer_path(snap.layer)
        try:
            chain = [p for p in qcow2.chain(path) if "layers" in p.parts or "images" in p.parts]
        except (OSError, ValueError):
            chain = []
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

    async def snapshot_list(self: LocalBackend, box_id: str) -> list[SnapshotInfo]:
        rec = self._record(box_id)
        return [self._snapshot_info(s) for s in self.store.list_snapshots(rec.id)]

    async def snapshot_get(self: LocalBackend, box_id: str, name: str) -> SnapshotInfo | None:
        rec = self._record(box_id)
        snap = self.store.get_snapshot(rec.id, name)
        return self._snapshot_info(snap) if snap else None

    async def snapshot_restore(self: LocalBackend, box_id: str, name: str) -> BoxInfo:
        rec, snap = self._snapshot(box_id, name)
        t0 = time.perf_counter()
        box_dir = self.home.box_dir(rec.id)
        # The record moves first (holding the snapshot's layer, found in the same
        # transaction); the files follow; recovery finishes a restore cut in between. A box
        # whose files agree with its record is claimed in that same transaction.
        quiet = self.layers.quiet_top(box_dir)
        restored = None
        if quiet is not None:
            restored = self.store.restore_layer(
                rec.id, snap.name, (RULES[Operation.RESTORE].allowed, os.getpid(), quiet[1])
            )
        async with self._claim(rec, Operation.RESTORE, held=restored is not None) as claim:
            if restored is None or quiet is None:
                self.layers.commit(box_dir)  # a crashed one first
                self._sync_layer(rec.id)
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
        return self._info(self._record(rec.id))

    async def snapshot_remove(self: LocalBackend, box_id: str, name: str) -> None:
        _rec, snap = self._snapshot(box_id, name)
        dead = self.store.remove_snapshot(snap.id)  # the name and its reference go at once
        faults.point("snapshot-remove:row-deleted")
        self.layers.collect(self.store, dead)
        box_memory.drop_snapshot(self.home.box_dir(_rec.id), snap.id)

    # -- clones -----------------------------------------------------------------------
    async def clone(self: LocalBackend, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxInfo]:
        """Clone a box (or one of its snapshots) ``len(names)`` times from one capture."""
        if not names:
            raise InvalidArgument("clone needs at least one name (or None for a generated one)")
        rec = self._record(box_id)
        ids = [secrets.token_hex(16) for _ in names]
        final_names = [
            check_name(n) if n is not None else f"{rec.name[:100]}-{i[:8]}" for n, i in zip(names, ids, strict=True)
        ]
        if len(set(final_names)) != len(final_names):
            raise InvalidArgument("clone names must be distinct")
        for n in final_names:
            if self.store.get_box(n) is not None:
                raise AlreadyExists(f"a box named {n!r} already exists: choose another name")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        gone = f"box {rec.name!r} (or its snapshot) was removed while it was being cloned"
        staged: list[Path] = []
        if options.from_snapshot is not None:
            # No claim on the box: the snapshot's layer is pinned in the transaction that
            # finds the snapshot, so removing either meanwhile cannot collect it.
            pinned = self.store.pin_snapshot(rec.id, options.from_snapshot, os.getpid())
            if pinned is None:
                self._snapshot(rec.id, options.from_snapshot)  # raises NotFound
                raise NotFound(gone)
            layer, pin = pinned[0].layer, pinned[1]
        else:
            async with self._claim(rec, Operation.CLONE) as claim:
                cap = await self._capture(rec, options.snapshot.validate())
                pin = self.store.record_capture(rec.id, cap.layer, cap.parent, pin_pid=os.getpid(), release=True)
                assert pin is not None
                claim.ended = True
                layer, timings = cap.layer, cap.timings
        try:
            staged = await self._stage(rec, layer, ids, options.cow)
            faults.point("clone:staged")
            records = []
            own_timings = {"clone_ms": round((time.perf_counter() - t0) * 1000, 2)}
            if "pause_ms" in timings:
                own_timings["pause_ms"] = timings["pause_ms"]
            for box_id_new, name, work in zip(ids, final_names, staged, strict=True):
                self.layers.publish(work, self.home.box_dir(box_id_new))
                records.append(self._clone_record(rec, box_id_new, name, own_timings, layer if options.cow else None))
            faults.point("clone:renamed")
            self.store.insert_clones(records, pin)  # the commit point: all clones appear at once
            for r in records:
                (self.home.box_dir(r.id) / OWNER).unlink(missing_ok=True)
        except BaseException:
            for box_id_new, work in zip(ids, staged, strict=False):
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(self.home.box_dir(box_id_new), ignore_errors=True)
            self.layers.collect(self.store, self.store.unpin(pin))
            raise
        infos = [self._info(r) for r in records]
        if options.start_after_clone:
            infos = [await self.start(r.id) for r in records]
        return infos

    async def _stage(self: LocalBackend, src: BoxRecord, layer: str, ids: list[str], cow: bool) -> list[Path]:
        if cow:
            return self._stage_clones(src, layer, ids, cow)
        return await asyncio.to_thread(self._stage_clones, src, layer, ids, cow)

    def _stage_clones(self: LocalBackend, src: BoxRecord, layer: str, ids: list[str], cow: bool) -> list[Path]:
        """Write each clone's disks in a staging directory (invisible until renamed)."""
        guest_backing = qcow2.read_header(self.home.box_dir(src.id) / GUEST_TOP)
        size = qcow2.read_header(self.layers.layer_path(layer)).size
        staged = []
        try:
            for _ in ids:
                work = self.home.staging_dir("clone-")
                staged.append(work)
                if cow:
                    self.layers.new_top(work, layer, size)
                else:
                    qcow2.flatten(self.layers.layer_path(layer), work / TOP)
                qcow2.write_overlay(work / GUEST_TOP, guest_backing.size, guest_backing.backing_file, "raw")
                work.chmod(0o700)
                mark_owner(work)
        except BaseException:
            for work in staged:
                shutil.rmtree(work, ignore_errors=True)
            raise
        return staged

    def _clone_record(
        self: LocalBackend, src: BoxRecord, box_id: str, name: str, timings: dict[str, float], layer: str | None
    ) -> BoxRecord:
        return BoxRecord(
            id=box_id,
            name=name,
            status=BoxStatus.STOPPED if src.status != BoxStatus.CONFIGURED else BoxStatus.CONFIGURED,
            image=src.image,
            image_digest=src.image_digest,
            options=dict(src.options),
            mac=qemu.new_mac(),
            guest_bundle=src.guest_bundle,
            timings=dict(timings),
            layer=layer,
        )

    async def _release(self: LocalBackend, rec: BoxRecord, node: str) -> None:
        """Have the supervisor fold an export's capture back into the running box (in the
        background), so its chain is not lengthened for good. Best effort: if the box
        stopped meanwhile, the layer simply stays in its chain."""
        try:
            conn = await self._conn(rec.id, rec.name)
            await conn.request("release", node=node)
        except EngineError as exc:
            log.warning("box %s keeps its export capture as a layer: %s", rec.name, exc)

    # -- export / import --------------------------------------------------------------
    async def export_stream(self: LocalBackend, box_id: str, options: ExportOptions) -> ByteStream:
        """One pass over the box's disk at a point in time, as ``.boxsnap`` bytes in archive order."""
        options.validate()
        rec = self._record(box_id)

        async def work(out: IO[bytes]) -> None:
            def write(top: Path, manifest: dict[str, object]) -> None:
                archive.write_stream(top, out, manifest, compress=options.compress, level=options.compression_level)
                out.flush()

            await self._export(rec, options, write)

        return await produced(work)

    async def _export(
        self: LocalBackend, rec: BoxRecord, options: ExportOptions, write: Callable[[Path, dict[str, object]], None]
    ) -> None:
        t0 = time.perf_counter()
        async with self._claim(rec, Operation.EXPORT):
            box_dir = self.home.box_dir(rec.id)
            cap = None
            if rec.status in (BoxStatus.RUNNING, BoxStatus.PAUSED):
                cap = await self._capture(rec, SnapshotOptions())
                self.store.record_capture(rec.id, cap.layer, cap.parent)
                top, consistency, timings = self.layers.layer_path(cap.layer), cap.consistency, cap.timings
            else:  # at rest, and the claim keeps it so: read its top directly, no capture
                self.layers.commit(box_dir)
                top, consistency, timings = box_dir / TOP, "stopped", {"pause_ms": 0.0}
            metadata = {k: v for k, v in rec.options.items() if k != "env"} if options.include_metadata else None
            manifest = {
                "box_name": rec.name,
                # a local OCI image is recorded by its path: keep only its name (no host paths)
                "image": Path(rec.image).name if rec.image.startswith("/") else rec.image,
                "image_digest": rec.image_digest,
                "guest_bundle": rec.guest_bundle,
                "consistency": consistency,
                **({"box_options": metadata} if metadata is not None else {}),
            }
            try:
                await asyncio.to_thread(write, top, manifest)
            finally:
                if cap is not None and cap.node is not None:
                    await self._release(rec, cap.node)
        self.store.add_timing(rec.id, export_ms=(time.perf_counter() - t0) * 1000, **timings)

    async def import_stream(
        self: LocalBackend, source: Callable[[], AsyncIterator[bytes]], name: str | None, untrusted: bool, label: str
    ) -> BoxInfo:
        """Verify an archive completely, then create a new box from it; a failure leaves nothing."""
        reader = ThreadReader(asyncio.get_running_loop())
        return await pump(source(), reader, self._import(reader, label, name, untrusted))

    async def _import(self: LocalBackend, source: IO[bytes], label: str, name: str | None, untrusted: bool) -> BoxInfo:
        """Import from a blocking byte stream, read exactly once."""
        if name is not None:
            check_name(name)
            if self.store.get_box(name) is not None:
                raise AlreadyExists(f"a box named {name!r} already exists: choose another name")
        t0 = time.perf_counter()
        box_id = secrets.token_hex(16)
        work = self.home.staging_dir("import-")
        try:
            verified = await asyncio.to_thread(archive.read_archive, source, work, IMPORT_LIMIT, None, label)
            manifest = verified.manifest
            final_name = name or _free_name(self, str(manifest.get("box_name") or "imported"))
            options = _imported_options(manifest, untrusted)
            box_dir = work / "box"
            box_dir.mkdir(mode=0o700)
            os.rename(verified.disk, box_dir / TOP)
            bundle = self._bundle()
            rootfs_size = bundle.rootfs.stat().st_size
            final = self.home.box_dir(box_id)
            qcow2.write_overlay(box_dir / GUEST_TOP, rootfs_size, os.path.relpath(bundle.rootfs, final), "raw")
            mark_owner(box_dir)
            self.layers.publish(box_dir, final)
            rec = BoxRecord(
                id=box_id,
                name=final_name,
                status=BoxStatus.STOPPED,
                image=str(manifest.get("image") or "imported"),
                image_digest=manifest.get("image_digest") if isinstance(manifest.get("image_digest"), str) else None,
                options=options,
                mac=qemu.new_mac(),
                guest_bundle=bundle.id,
                timings={"import_ms": round((time.perf_counter() - t0) * 1000, 2)},
            )
            try:
                self.store.insert_box(rec)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            (final / OWNER).unlink(missing_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self._info(rec)

    # -- space ------------------------------------------------------------------------
    def _gc(self: LocalBackend) -> list[str]:
        """Roll forward what crashed operations left: tombstoned layers whose files may
        remain, pins of clones never made. Reads only those rows (no walk of the home)."""
        self.store.release_dead_pins(_pid_alive)
        return self.layers.collect(self.store, self.store.tombstones())

    def check_layers(self: LocalBackend, repair: bool = False) -> Scan:
        """The full consistency scan (``boxvm doctor``): see :meth:`LayerStore.scan`."""
        return self.layers.scan(self.store, repair)

    async def disk_usage(self: LocalBackend) -> DiskUsage:
        boxes = {rec.name: rec for rec in self.store.list_boxes()}
        snaps = self.store.list_snapshots()
        by_id = {rec.id: rec.name for rec in boxes.values()}
        owners: dict[str, Path] = {f"box:{n}": self.home.box_dir(r.id) / TOP for n, r in boxes.items()}
        owners.update(
            {f"snap:{by_id.get(s.box_id, s.box_id)}/{s.name}": self.layers.layer_path(s.layer) for s in snaps}
        )
        usage = await asyncio.to_thread(self.layers.usage, owners, [s.layer for s in snaps])
        total = sum(qcow2.allocated_bytes(p) for p in self.layers.layer_files())
        total += sum(qcow2.allocated_bytes(self.home.box_dir(r.id) / TOP) for r in boxes.values())
        return DiskUsage(
            boxes={k[4:]: (u.owned_bytes, u.shared_bytes) for k, u in usage.items() if k.startswith("box:")},
            snapshots={k[5:]: (u.owned_bytes, u.shared_bytes) for k, u in usage.items() if k.startswith("snap:")},
            layers_bytes=total,
        )


IMPORT_LIMIT = int(os.environ.get("BOXVM_IMPORT_LIMIT_BYTES", 256 << 30))


def _free_name(backend: LocalBackend, wanted: str) -> str:
    base = wanted if NAME_RE.match(wanted) else "imported"
    name, n = base, 1
    while backend.store.get_box(name) is not None:
        n += 1
        name = f"{base[:120]}-{n}"
    return name


def _imported_options(manifest: dict[str, object], untrusted: bool) -> dict[str, object]:
    """Box options from a manifest, validated; host-specific ones dropped when untrusted."""
    raw = manifest.get("box_options")
    data = dict(raw) if isinstance(raw, dict) else {}
    image_config = data.pop("image_config", None)
    size = manifest["disk_virtual_size"]
    data["disk_size_gb"] = max(1, -(-int(size) // (1 << 30)))  # type: ignore[call-overload]
    data.pop("env", None)
    if untrusted:
        data.pop("ports", None)
        data["cpus"] = min(int(data.get("cpus", 1) or 1), os.cpu_count() or 1)  # type: ignore[call-overload]
        data["memory_mib"] = min(int(data.get("memory_mib", 512) or 512), 4096)  # type: ignore[call-overload]
    try:
        options = BoxOptions.from_dict(data).validate()
    except (InvalidArgument, TypeError, ValueError) as exc:
        raise ArchiveError(f"the archive's box options are invalid: {exc}") from exc
    out = options.to_dict()
    out["image_config"] = image_config if isinstance(image_config, dict) else {}
    return out
