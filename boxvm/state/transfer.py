"""Export and import: a box as ``.boxsnap`` bytes and back, and the manifest they carry.

Export reads one point in time of the box's disk (its top at rest under the claim, or a
capture of a running box) in one pass. Import verifies the whole archive under ``tmp/``
before anything is published, then stages the box as create and clone do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

from boxvm import archive, memarchive
from boxvm.disks.layers import TOP
from boxvm.engine import qemu
from boxvm.errors import AlreadyExists, ArchiveError, EngineError, InvalidArgument
from boxvm.options import (
    NAME_RE,
    BoxInfo,
    BoxOptions,
    ExportOptions,
    SnapshotOptions,
    check_box_id,
    check_migration_nonce,
    check_name,
)
from boxvm.state import memory_transfer
from boxvm.state.snapshots import Snapshots
from boxvm.status import BoxStatus, Operation
from boxvm.store import BoxRecord
from boxvm.streams import ByteStream, StreamAborted, ThreadReader, produced, pump

log = logging.getLogger("boxvm")
IMPORT_LIMIT = int(os.environ.get("BOXVM_IMPORT_LIMIT_BYTES", 256 << 30))


class Transfer:
    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self.boxes = snapshots.boxes
        self.ctx, self.home, self.store, self.layers = snapshots.ctx, snapshots.home, snapshots.store, snapshots.layers

    # -- export -----------------------------------------------------------------------
    async def export_stream(self, box_id: str, options: ExportOptions, holder: str | None = None) -> ByteStream:
        """One pass over the box's disk at a point in time, as ``.boxsnap`` bytes in archive
        order. ``holder``: the migration that holds the box, if this export is its (``require_holder``)."""
        options.validate()
        rec = self.boxes.record(box_id)

        async def work(out: IO[bytes]) -> None:
            def write(top: Path, manifest: dict[str, object], memory: memarchive.Plan | None = None) -> None:
                level = options.compression_level
                archive.write_stream(top, out, manifest, compress=options.compress, level=level, memory=memory)
                out.flush()

            await self._export(rec, options, write, holder)

        return await produced(work)

    async def _export(
        self, rec: BoxRecord, options: ExportOptions, write: Callable[..., None], holder: str | None
    ) -> None:
        t0 = time.perf_counter()
        async with self.boxes.claim(rec, Operation.EXPORT, holder=holder):
            box_dir = self.home.box_dir(rec.id)
            cap = None
            if rec.status in (BoxStatus.RUNNING, BoxStatus.PAUSED):
                cap = await self.snapshots.capture(rec, SnapshotOptions())
                self.store.record_capture(rec.id, cap.layer, cap.parent)
                top, consistency, timings = self.layers.layer_path(cap.layer), cap.consistency, cap.timings
            else:  # at rest, and the claim keeps it so: read its top directly, no capture
                self.layers.commit(box_dir)
                self.boxes.renew_fresh(self.store.get_box(rec.id) or rec)  # a fresh top a crash lost
                top, consistency, timings = box_dir / TOP, "stopped", {"pause_ms": 0.0}
            manifest, memory = export_manifest(rec, consistency, options.include_metadata), None
            if rec.status == BoxStatus.SUSPENDED:  # its saved memory goes with its disk
                memory, manifest["memory"] = memory_transfer.export_plan(box_dir, rec, self.home.cache)
                manifest["consistency"] = "suspended"
            below = self.store.layer_chain(cap.parent if cap is not None else self.boxes.record(rec.id).layer)
            await asyncio.to_thread(self.layers.verify_chain, top, below)  # the bytes of no other file
            try:
                await asyncio.to_thread(write, top, manifest, memory)
            finally:
                if cap is not None and cap.node is not None:
                    await self._release(rec, cap.node)
        self.store.add_timing(rec.id, export_ms=(time.perf_counter() - t0) * 1000, **timings)

    async def _release(self, rec: BoxRecord, node: str) -> None:
        """Have the supervisor fold an export's capture back into the running box (in the
        background), so its chain is not lengthened for good. Best effort: if the box
        stopped meanwhile, the layer simply stays in its chain."""
        try:
            conn = await self.ctx.conns.get(rec.id, rec.name)
            await conn.request("release", node=node)
        except EngineError as exc:
            log.warning("box %s keeps its export capture as a layer: %s", rec.name, exc)

    # -- import -----------------------------------------------------------------------
    async def import_stream(
        self,
        source: Callable[[], AsyncIterator[bytes]],
        name: str | None,
        untrusted: bool,
        label: str,
        box_id: str | None = None,
        nonce: str | None = None,
    ) -> BoxInfo:
        """Verify an archive completely, then create a new box from it; a failure leaves nothing.
        ``box_id``: the id the box keeps when it moves here (``boxvm.migrate``), else a new one;
        ``nonce``: that migration's mark, kept in the record's options (never taken from an archive)."""
        reader = ThreadReader(asyncio.get_running_loop())
        return await pump(source(), reader, self._import(reader, label, name, untrusted, box_id, nonce))

    async def _import(
        self, source: ThreadReader, label: str, name: str | None, untrusted: bool, box_id: str | None, nonce: str | None
    ) -> BoxInfo:
        """Import from a blocking byte stream, read exactly once."""
        if name is not None:
            self.boxes.check_free(check_name(name))
        if box_id is not None and self.store.get_box(check_box_id(box_id)) is not None:
            raise AlreadyExists(f"a box with id {box_id} already exists here")
        t0 = time.perf_counter()
        box_id = box_id or secrets.token_hex(16)
        with self.home.staging("archive-") as scratch:
            verified = await asyncio.to_thread(archive.read_archive, source, scratch, IMPORT_LIMIT, None, label)
            if source.aborted:  # cancelled after its last read: from here to the commit is one step of the loop
                raise StreamAborted("the import was cancelled")
            manifest = verified.manifest
            digest = manifest.get("image_digest")
            options = options_from_manifest(manifest, untrusted)
            options.pop("migration", None)
            if nonce is not None:
                options["migration"] = check_migration_nonce(nonce)
            bundle = self.boxes.bundle()
            with self.boxes.staging([box_id], "import") as stage:
                work = stage.dirs[0]
                os.rename(verified.disk, work / TOP)
                self.layers.new_guest_top(work, bundle.rootfs)
                rec = BoxRecord(
                    id=box_id,
                    name=name or self._unused_name(str(manifest.get("box_name") or "imported")),
                    status=BoxStatus.SUSPENDED if verified.memory else BoxStatus.STOPPED,
                    image=str(manifest.get("image") or "imported"),
                    image_digest=digest if isinstance(digest, str) else None,
                    options=options,
                    mac=qemu.new_mac(),
                    guest_bundle=bundle.id,
                    timings={"import_ms": round((time.perf_counter() - t0) * 1000, 2)},
                )
                if verified.memory is not None:  # refused unless this box can resume it here
                    memory_transfer.import_into(work, verified, rec, self.home.cache, label)
                stage.publish(lambda: self.store.insert_box(rec))
        return self.boxes.info(rec)

    def _unused_name(self, wanted: str) -> str:
        base = wanted if NAME_RE.fullmatch(wanted) else "imported"
        name, n = base, 1
        while self.store.get_box(name) is not None:
            n += 1
            name = f"{base[:120]}-{n}"
        return name


# -- the manifest -----------------------------------------------------------------------
# Never in an archive: the box's environment (secrets), and the marks of migrations (the
# nonce a move imported the box with, the lease a move holds it by).
_PRIVATE = frozenset({"env", "migration", "lease"})


def export_manifest(rec: BoxRecord, consistency: str, include_metadata: bool) -> dict[str, object]:
    """What an archive says of the box (the disk's checksums and sizes are added by
    ``archive.write_stream``); never a host path, never the box's environment."""
    metadata = {k: v for k, v in rec.options.items() if k not in _PRIVATE} if include_metadata else None
    return {
        "box_name": rec.name,
        # a local OCI image is recorded by its path: keep only its name (no host paths)
        "image": Path(rec.image).name if rec.image.startswith("/") else rec.image,
        "image_digest": rec.image_digest,
        "guest_bundle": rec.guest_bundle,
        "consistency": consistency,
        **({"box_options": metadata} if metadata is not None else {}),
    }


def options_from_manifest(manifest: dict[str, Any], untrusted: bool) -> dict[str, object]:
    """Box options from a manifest, validated; host-specific ones dropped when untrusted."""
    raw = manifest.get("box_options")
    data = dict(raw) if isinstance(raw, dict) else {}
    if isinstance(manifest.get("memory"), dict):  # a suspended box: its machine's size, options or not
        data.setdefault("memory_mib", manifest["memory"]["memory_mib"])
        data.setdefault("cpus", manifest["memory"]["cpus"])
    image_config = data.pop("image_config", None)
    size = manifest["disk_virtual_size"]
    data["disk_size_gb"] = max(1, -(-int(size) // (1 << 30)))
    data.pop("env", None)
    if untrusted:
        data.pop("ports", None)
        data["cpus"] = min(int(data.get("cpus", 1) or 1), os.cpu_count() or 1)
        data["memory_mib"] = min(int(data.get("memory_mib", 512) or 512), 4096)
    try:
        options = BoxOptions.from_dict(data).validate()
    except (InvalidArgument, TypeError, ValueError) as exc:
        raise ArchiveError(f"the archive's box options are invalid: {exc}") from exc
    out = options.to_dict()
    out["image_config"] = image_config if isinstance(image_config, dict) else {}
    return out
