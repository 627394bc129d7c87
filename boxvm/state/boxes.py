"""Boxes: records, reconcile, crash recovery, the claim, staging, create and remove.

A box exists once its record is committed. Its directory is written under ``tmp/`` first
(:class:`Staging`, the one sequence create, clone and import share), renamed into
``boxes/`` and then recorded; a crash in between leaves a directory recovery removes.
Every state operation holds the box by a claim in the store (:meth:`Boxes.claim`), so a
second one from any process fails at once; recovery finishes the claims of processes that
died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from boxvm import faults, publish
from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP, Scan, fsync_dir, fsync_files, guest_reference, layer_of
from boxvm.engine import memory, qemu
from boxvm.errors import AlreadyExists, BoxNotFound, InvalidState, StorageError
from boxvm.guest import bundle as bundle_mod
from boxvm.options import BoxInfo, BoxOptions, DiskUsage, check_name, default_command
from boxvm.processes import alive as pid_alive
from boxvm.state import starting
from boxvm.state.context import Context
from boxvm.status import LIVE, RULES, BoxStatus, Operation, require, require_holder
from boxvm.store import BoxRecord
from boxvm.store.db import FRESH_BOTH

log = logging.getLogger("boxvm")

# A box directory renamed into boxes/ whose record is not committed yet names its process:
# in an extended attribute, else (a filesystem without user xattrs) in a file.
OWNER_XATTR = "user.boxvm.owner"
OWNER = ".owner"


@dataclass
class Claim:
    ended: bool = False  # the operation's last transaction ended it (one transaction fewer)
    timings: dict[str, float] = field(default_factory=dict)  # recorded when the claim ends


class Staging:
    """New box directories, one per id, written under ``tmp/`` where nobody sees them.
    :meth:`publish` renames them into ``boxes/`` and commits their records: the
    directories, then the records (the commit point); until the records are committed,
    each directory names its process (:func:`mark_owner`) so that recovery leaves it alone while
    the process lives and removes it once it is dead."""

    def __init__(self, ctx: Context, ids: list[str], kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.ids = ids
        self.dirs = [ctx.home.staging_dir(f"{kind}-") for _ in ids]
        self.finals = [ctx.home.box_dir(box_id) for box_id in ids]
        self.published: list[Path] = []
        self.committed = False
        self.owner_files = False  # the owner is named by a file (no xattrs here)

    def publish(self, commit: Callable[[], None], sync: bool = True) -> None:
        """Rename every staged directory into ``boxes/`` (durably), then ``commit`` the records.
        ``sync=False``: the directories hold only fresh tops, which their records (marked
        :data:`FRESH_BOTH`) can regenerate, directory and all (:meth:`Boxes.renew_fresh`)."""
        for work in self.dirs:
            work.chmod(0o700)
            self.owner_files |= mark_owner(work)
        self.ctx.layers.publish(list(zip(self.dirs, self.finals, strict=True)), self.published, sync)
        faults.point(f"{self.kind}:renamed")
        commit()  # the commit point: before it, recovery removes the directories
        self.committed = True

    def _discard(self) -> None:
        for path in [*self.dirs, *self.published]:
            shutil.rmtree(path, ignore_errors=True)

    def _release(self) -> None:
        for final in self.published:
            clear_owner(final, self.owner_files)


class Boxes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.home, self.store, self.layers = ctx.home, ctx.store, ctx.layers

    # -- staging ----------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, ids: list[str], kind: str) -> Iterator[Staging]:
        """Stage a directory per new box id (``Staging.dirs``); the body writes their files
        and calls ``Staging.publish``. Any failure before the commit removes every staged
        and published directory; nothing is left behind."""
        staged = Staging(self.ctx, ids, kind)
        try:
            yield staged
        finally:
            if staged.committed:
                staged._release()
            else:  # failed (or returned) before the commit
                staged._discard()

    def bundle(self) -> bundle_mod.Bundle:
        found = bundle_mod.find(self.home)
        return found if found is not None else bundle_mod.ensure(self.home, self.ctx.progress)

    # -- records ----------------------------------------------------------------------
    def record(self, id_or_name: str) -> BoxRecord:
        rec = self.store.get_box(id_or_name)
        if rec is None:
            raise BoxNotFound(f"no box named or with id {id_or_name!r}: `boxvm ls` lists them")
        return self.reconcile(rec)

    def reconcile(self, rec: BoxRecord) -> BoxRecord:
        """A box whose supervisor is gone is not running, whatever the store says."""
        rec = self.finish_crashed_operation(rec)
        if not rec.status.is_live:
            return rec
        alive = rec.supervisor_pid is not None and pid_is(rec.supervisor_pid, rec.id)
        if alive:
            return rec
        if rec.supervisor_pid is None and rec.status == BoxStatus.STARTING:  # no supervisor took it (yet)
            start = starting.read(self.home.box_dir(rec.id), rec.started_at)
            if start is None and _recent(rec):
                return rec  # under way, as far as anyone knows
            if start is not None and starting.owner_alive(start):
                return rec  # under way, however slow: undone under a live starter, it would act on the box
            if start is not None:  # its process died first: back to where it was (state/starting)
                if self.store.roll_back_start(rec.id, start.token, start.prior, start.prior_started_at):
                    log.warning("box %s: a start interrupted before its supervisor ran was undone", rec.name)
                    starting.discard(self.home.box_dir(rec.id), start.token)
                return self.store.get_box(rec.id) or rec  # undone, or its supervisor came first
        if rec.qemu_pid is not None and pid_is(rec.qemu_pid, rec.id):
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

    def info(self, rec: BoxRecord) -> BoxInfo:
        opts = BoxOptions.from_dict(rec.options)
        disk = self.home.box_dir(rec.id) / TOP
        depth = self.layers.chain_depth(disk, self.store.layer_chain(rec.layer))  # from the store; no file read
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
            migration=rec.options.get("migration"),
        )

    def listed(self, rec: BoxRecord) -> BoxInfo:
        """A box as listed (and got): one whose record cannot be shown is listed as failed,
        with the reason, rather than making the list of every box fail (it can be removed)."""
        try:
            return self.info(rec)
        except Exception as exc:  # any defect of one stored record
            log.warning("box %s has an unreadable record: %r", rec.id, exc)
            return BoxInfo(
                id=rec.id, name=rec.name, status=BoxStatus.FAILED, image=str(rec.image), created_at=rec.created_at,
                started_at=None, cpus=0, memory_mib=0, disk_size_bytes=0, disk_bytes=0, chain_depth=0, ports=[],
                guest_bundle=None, error="the box's stored options are unreadable: remove the box", timings={},
                command=[],
            )  # fmt: skip

    def check_free(self, name: str) -> None:
        if self.store.get_box(name) is not None:
            raise AlreadyExists(f"a box named {name!r} already exists: choose another name or remove it")

    # -- the claim --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def claim(
        self, rec: BoxRecord, operation: Operation, held: bool = False, holder: str | None = None
    ) -> AsyncIterator[Claim]:
        """Hold the box for a state operation (allowed from its rule's statuses, shown as its
        rule's transient status); ``held``: the operation's first transaction claimed it
        already (a box at rest whose files agree with its record). ``holder``: the
        migration this operation is part of, if one holds the box (``require_holder``)."""
        rule = RULES[operation]
        if not held and not self.store.begin_operation(rec.id, operation, rule.allowed, os.getpid(), holder):
            now = self.record(rec.id)
            require_holder(operation, rec.name, now.options.get("lease"), holder)
            require(operation, rec.name, now.status, now.operation)
            raise InvalidState(f"cannot {rule.verb} box {rec.name!r}: its status changed meanwhile; try again")
        claim = Claim()
        try:
            yield claim
        finally:
            if not claim.ended:
                self.store.end_operation(rec.id, claim.timings)

    def sync_layer(self, box_id: str) -> None:
        """Make the box's record name the layer its top backs onto (one header read), for
        what a crash left between files and record. Only with the box claimed.

        A layer no row knows whose parent is the recorded one is a capture whose record
        was lost: it is recorded. A layer that has a row wins over the record (a capture
        folded back, a restore that never reached its files). Otherwise the top backs
        onto a layer already released (a restore whose record committed): the restore is
        finished, at rest; a running box's supervisor owns its top and it is left. A box
        at rest whose record marks its top fresh: the record wins (its top is re-created
        over the recorded layer), but for a capture its process did not record."""
        rec = self.store.get_box(box_id)
        box_dir = self.home.box_dir(box_id)
        if rec is None:
            return
        renewable = bool(rec.fresh) and not rec.status.is_live
        try:
            actual = layer_of(box_dir / TOP)
        except (OSError, ValueError):
            if renewable:
                self.renew_fresh(rec)
            return  # else no readable top: nothing to agree with (the consistency scan reports it)
        if actual == rec.layer:
            if renewable:
                self.renew_fresh(rec)  # (a top over the right layer that a crash cut)
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
        if renewable:
            self.renew_fresh(rec)
        elif actual is None or self.store.has_layer(actual):
            log.warning("box %s: its record follows its disk (layer %s)", rec.name, actual)
            self.layers.collect(self.store, self.store.set_box_layer(box_id, actual), synced=[box_dir])
        elif not rec.status.is_live and rec.layer is not None:
            log.warning("box %s: finishing an interrupted restore", rec.name)
            self.layers.restore(box_dir, rec.layer, qcow2.read_header(box_dir / TOP).size)

    def renew_fresh(self, rec: BoxRecord) -> None:
        """Re-create the fresh tops of a box at rest (``rec.fresh``) that a crash lost or cut
        (see "Fresh tops" in ``disks/layers.py``), and make a copy-on-write clone's guest top
        (a clone is made without it). Only with the box claimed, or starting."""
        if not rec.fresh or rec.layer is None:
            return
        box_dir = self.home.box_dir(rec.id)
        if rec.fresh == FRESH_BOTH and not box_dir.exists():  # a clone's rename a crash lost
            log.warning("box %s: re-creating its directory (a crash lost it)", rec.name)
            box_dir.mkdir(mode=0o700)
        self.layers.renew(box_dir, rec.layer)
        if rec.fresh == FRESH_BOTH:  # a clone never started: its guest top is an empty overlay too
            bundle = bundle_mod.find(self.home, rec.guest_bundle)
            guest = box_dir / GUEST_TOP
            if bundle is None:
                raise StorageError(f"box {rec.name!r}: its guest bundle is gone: run `boxvm setup`")
            if not qcow2.is_empty_overlay(guest, guest_reference(box_dir, bundle.rootfs), "raw"):
                if os.path.lexists(guest):  # (a copy-on-write clone's is made here, at first use)
                    log.warning("box %s: re-creating its fresh guest top (a crash cut it)", rec.name)
                    guest.unlink()
                self.layers.new_guest_top(box_dir, bundle.rootfs, sync=False)  # (synced by settle_fresh)

    def settle_fresh(self, rec: BoxRecord) -> None:
        """Before a box's first boot since its tops were made: check (re-create) them and make
        them durable, then record that they are no longer fresh -- from now on the guest
        writes into them (one or two fsyncs and a directory's, where a boot costs seconds)."""
        if not rec.fresh:
            return
        self.renew_fresh(rec)
        box_dir = self.home.box_dir(rec.id)
        fsync_files([box_dir / TOP, *([box_dir / GUEST_TOP] if rec.fresh == FRESH_BOTH else [])])
        fsync_dir(box_dir)
        if rec.fresh == FRESH_BOTH:  # a clone: its own entry in boxes/ too
            fsync_dir(box_dir.parent)
        self.store.settle_fresh(rec.id)

    # -- recovery ---------------------------------------------------------------------
    def recover(self) -> None:
        """Remove what crashed operations left: staging dirs of dead processes, box
        directories with no record (a create that never committed); finish their claims."""
        publish.recover(self.home.tmp, pid_alive)  # before the loop below deletes its journal
        self.layers.recover_trash(self.store, pid_alive)  # (likewise)
        for entry in self.home.tmp.iterdir():
            pid = entry.name.split("-")[-2] if entry.name.count("-") >= 2 else ""
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        records = self.store.list_boxes()
        known = {rec.id for rec in records}
        for entry in self.home.boxes.iterdir():
            owner = owner_of(entry)
            if owner is not None and pid_alive(owner):
                continue  # another process is about to commit this box
            # (``known`` may predate a box another process committed, then un-owned, since)
            if entry.name not in known and self.store.get_box(entry.name) is None:
                log.info("removing orphaned box directory %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif owner is not None:  # committed by a process that died before it cleared its mark
                clear_owner(entry, True)
        for rec in records:
            self.finish_crashed_operation(rec)
        self.gc()
        self.layers.trash.flush()

    def finish_crashed_operation(self, rec: BoxRecord) -> BoxRecord:
        """A state operation whose process died: release the box and, if it is at rest,
        roll its disk change forward (always data-safe: a pending top is empty or holds
        the newest writes). A running box's supervisor settles its own pending top."""
        if rec.operation is None or (rec.operation_pid is not None and pid_alive(rec.operation_pid)):
            return rec
        if not self.store.take_over_operation(rec.id, rec.operation_pid, os.getpid()):
            return self.store.get_box(rec.id) or rec  # another process is finishing it
        log.warning("finishing the interrupted %s of box %s", rec.operation.value, rec.name)
        if not (rec.status.is_live and rec.supervisor_pid and pid_is(rec.supervisor_pid, rec.id)):
            self.layers.commit(self.home.box_dir(rec.id))
            if rec.operation == Operation.MEMORY_SNAPSHOT:  # no supervisor writes its capture
                memory.sweep(self.home.box_dir(rec.id), {s.id for s in self.store.list_snapshots(rec.id)})
        self.sync_layer(rec.id)
        self.store.end_operation(rec.id)
        return self.store.get_box(rec.id) or rec

    def gc(self) -> list[str]:
        """Roll forward what crashed operations left: tombstoned layers whose files may
        remain, pins of clones never made. Reads only those rows (no walk of the home)."""
        self.store.release_dead_pins(pid_alive)
        return self.layers.collect(self.store, self.store.tombstones())

    def check_layers(self, repair: bool = False) -> Scan:
        """The full consistency scan (``boxvm doctor``): see :meth:`LayerStore.scan`. Fresh
        tops a crash lost are re-created first (each box claimed meanwhile), so that their
        chains can be read."""
        allowed = RULES[Operation.RESTORE].allowed
        for rec in self.store.list_boxes():
            if rec.fresh and self.store.begin_operation(rec.id, Operation.RESTORE, allowed, os.getpid()):
                try:
                    self.layers.commit(self.home.box_dir(rec.id))
                    # Read again under the claim: the box may have been started (its top written,
                    # no longer fresh) and stopped since the list above.
                    now = self.store.get_box(rec.id)
                    if now is not None:
                        self.renew_fresh(now)
                finally:
                    self.store.end_operation(rec.id)
        return self.layers.scan(self.store, repair)

    async def disk_usage(self) -> DiskUsage:
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

    # -- create and remove ------------------------------------------------------------
    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo:
        t0 = time.monotonic()
        options.validate()
        box_id = secrets.token_hex(16)
        name = check_name(name) if name is not None else f"box-{box_id[:8]}"
        self.check_free(name)
        images = self.ctx.images
        image = await asyncio.to_thread(images.resolve, options.image, self.ctx.progress)
        async with images.in_use(image.digest):  # no removal of the image until the box's record exists
            base = await asyncio.to_thread(images.base_disk, image, options.disk_size_gb, self.ctx.progress)
            bundle = await asyncio.to_thread(self.bundle)
            final = self.home.box_dir(box_id)
            rec = BoxRecord(
                id=box_id,
                name=name,
                status=BoxStatus.CONFIGURED,
                image=image.reference,
                image_digest=image.digest,
                options={**options.to_dict(), "image_config": image.runtime_config},
                mac=qemu.new_mac(),
                guest_bundle=bundle.id,
            )
            with self.staging([box_id], "create") as stage:
                work = stage.dirs[0]
                # tmp/ and boxes/ sit at the same depth, so relative backing paths written
                # here stay valid after the rename (and when the whole home is moved).
                qcow2.write_overlay(work / TOP, qcow2.read_header(base).size, os.path.relpath(base, final))
                self.layers.new_guest_top(work, bundle.rootfs)
                rec.timings = {"create_ms": round((time.monotonic() - t0) * 1000, 2)}
                stage.publish(lambda: self.store.insert_box(rec))
        return self.info(rec)

    async def remove(self, box_id: str, force: bool, holder: str | None = None) -> None:
        rec = self.record(box_id)
        allowed = RULES[Operation.REMOVE].allowed
        # A box at rest whose files agree with its record goes in one transaction, which
        # checks that nothing holds it. Otherwise it is claimed like a state operation, so
        # none (nor a start or stop) runs on a box whose row and files are going away; a
        # second remover gets InvalidState/NotFound.
        quiet = self.layers.quiet_top(self.home.box_dir(rec.id)) if rec.status in allowed else None
        dead = self.store.remove_box(rec.id, (allowed, quiet[1]), holder) if quiet is not None else None
        if dead is None:
            async with self.claim(rec, Operation.FORCE_REMOVE if force else Operation.REMOVE, holder=holder) as c:
                rec = self.record(rec.id)
                if rec.status.is_live:
                    await self.kill(rec)
                await self.ctx.conns.drop(rec.id)
                self.sync_layer(rec.id)  # a capture left unrecorded by a crash is released too
                dead = self.store.remove_box(rec.id) or []  # the name and its references go at once; files follow
                c.ended = True  # (with the row)
        await self.ctx.conns.drop(rec.id)
        faults.point("remove:row-deleted")
        self.layers.trash.discard([(self.home.box_dir(rec.id), f"B-{rec.id}")], durable=self.store.sync)
        self.layers.collect(self.store, dead)  # layers only this box (and its snapshots) held

    async def kill(self, rec: BoxRecord) -> None:
        """Force a running box down (remove --force, a failed start or stop). If it is no
        longer live, whoever moved it on owns it; the pids are checked before any kill."""
        self.store.transition(rec.id, BoxStatus.STOPPING, LIVE, during_operation=True)
        # Read again after the box left ``starting``: a supervisor may have registered since
        # ``rec`` was read, and none can register (nor record its QEMU) from now on.
        now = self.store.get_box(rec.id)
        pids = {rec.qemu_pid, rec.supervisor_pid}
        if now is not None and now.started_at == rec.started_at:  # still that start's (not a later one's)
            pids |= {now.qemu_pid, now.supervisor_pid}
        pids.discard(None)
        for pid in pids:
            if pid is not None and pid_is(pid, rec.id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p is not None and pid_is(p, rec.id) for p in pids):
            await asyncio.sleep(0.02)


def mark_owner(directory: Path) -> bool:
    """Name this process as the owner of a staged box directory (``OWNER_XATTR``: no new
    file, where a file's inode allocation was the dearest step of a clone on a full
    filesystem); True if it had to be a file (``OWNER``) instead."""
    pid = str(os.getpid()).encode()
    try:
        os.setxattr(directory, OWNER_XATTR, pid)
        return False
    except OSError:  # refused (ENOTSUP, EPERM, an LSM's EACCES, ENOSPC for a small inode's xattr block)
        pass
    (directory / OWNER).write_bytes(pid)
    return True


def clear_owner(directory: Path, file: bool) -> None:
    """The directory's record is committed: nobody owns it any more (``file``: look for the
    ``OWNER`` file too)."""
    with contextlib.suppress(OSError):  # (none: an older boxvm's, or another filesystem's)
        os.removexattr(directory, OWNER_XATTR)
    if file:
        (directory / OWNER).unlink(missing_ok=True)


def owner_of(directory: Path) -> int | None:
    """The process that staged this box directory and has not committed its record yet."""
    try:
        return int(os.getxattr(directory, OWNER_XATTR))
    except (OSError, ValueError):
        pass
    try:
        return int((directory / OWNER).read_bytes())
    except (OSError, ValueError):
        return None


def pid_is(pid: int, box_id: str) -> bool:
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
