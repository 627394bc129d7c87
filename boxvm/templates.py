"""Warm-start templates: a box suspended at agent-ready, kept to resume new boxes from.

A template is made for one machine: (image digest, guest bundle, cpus, memory, network,
disk size) — everything its saved device state and disks depend on. It is a box booted
cold and suspended the moment its agent answered, its files moved into
``templates/<key>/``: the two disk deltas (``disk.qcow2`` over the image's base disk,
``guest-rootfs.qcow2`` over the bundle's root; a few hundred KB of mount metadata), the RAM
file, the device state and ``template.json``. ``templates/`` sits at the depth of
``boxes/``, so the deltas' relative backing paths hold in both.

The first ``start()`` of a box whose machine has a template (and ``BoxOptions.warm``)
copies the two deltas over its own fresh, never-written ones (same backing files, by name
and by identity: ``backing.json``)
and links the RAM as a fork's (``engine/memory.fork_into``): it resumes in well under a
second instead of booting, and is re-identified (hostname, machine-id) like any fork.

A template that cannot be resumed — its files fail the checks before QEMU starts
(damaged or truncated state, RAM file missing or of another size, a bad record), or QEMU
refuses its state, or the resumed guest does not answer — is *removed*, not quarantined:
nothing could use it, every later first start would pay for the failed attempt again,
and ``templates.create`` (or ``boxvm setup``) makes a good one in one cold boot. The same
``start()`` boots the box cold instead (:func:`fall_back`); the reason is logged (logger
``boxvm``, warning) and the box's timings get ``warm_fallback_ms`` (the time the failed
attempt cost). A transient failure (a resume timing out on an overloaded host) removes a
good template too: the price of never resuming a bad one twice.

Like a fork, a warm-started box maps the template's RAM privately (``share=off``): its own
suspend or memory snapshot is QEMU's migration of its whole touched RAM, the guest stopped
throughout, until its first stop or suspend gives it a RAM file of its own (measured: a
memory snapshot pauses the guest 1-2.7 s against 0.1-0.3 s for a cold-booted box). Giving
it one at start would copy the template's touched RAM (136 MiB at agent-ready for the
default image: 180-230 ms on this host's ext4, which has no reflinks) into every warm
start; docs/ENGINEERING.md has the fixes that would fit.

Files, not store rows: a template refers to nothing in the layer store and nothing refers
to it (a resumed box holds a hard link to its RAM and copies of the rest), so it is
published by one rename and removed by one ``rmtree``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP, fsync_dir, fsync_files
from boxvm.engine import memory
from boxvm.errors import NotFound, StorageError
from boxvm.options import BoxInfo, BoxOptions, TemplateInfo, check_template_id
from boxvm.paths import Home
from boxvm.status import BoxStatus, Operation
from boxvm.store import BoxRecord, Store

INFO = "template.json"
BACKING = "backing.json"  # which files the deltas were over (the same names can be rebuilt)
log = logging.getLogger("boxvm")


def machine(rec: BoxRecord) -> dict[str, Any]:
    """What a template must match to be resumed as this box."""
    opts = BoxOptions.from_dict(rec.options)
    return {
        "image_digest": rec.image_digest,
        "guest_bundle": rec.guest_bundle,
        "cpus": opts.cpus,
        "memory_mib": opts.memory_mib,
        "network": opts.network,
        "disk_size_gb": opts.disk_size_gb,
    }


def key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def root(home: Home) -> Path:
    return home.root / "templates"


def adopt(home: Home, box_dir: Path, rec: BoxRecord) -> TemplateInfo:
    """Make the template of ``rec``'s machine from the box in ``box_dir``, suspended at
    agent-ready and never changed since; replaces an older template of that machine."""
    spec = machine(rec)
    if len(qcow2.chain(box_dir / TOP)) != 2:
        raise StorageError("a template is made from a box whose disk is one delta over the image")
    root(home).mkdir(mode=0o700, exist_ok=True)
    work = home.staging_dir("template-")
    try:
        for name in (TOP, GUEST_TOP, memory.STATE):
            shutil.copyfile(box_dir / name, work / name)
        os.link(box_dir / memory.RAM, work / memory.RAM)  # the box is removed after: no copy
        shutil.copyfile(box_dir / memory.META, work / memory.META)  # last of the memory files
        (work / BACKING).write_text(json.dumps(_backing_files(box_dir)))
        info = TemplateInfo(id=key(spec), image=rec.image, created_at=time.time(), size_bytes=_allocated(work), **spec)
        (work / INFO).write_text(json.dumps(info.__dict__))
        work.chmod(0o700)
        dest = root(home) / info.id
        with contextlib.suppress(FileNotFoundError):
            _discard(home, dest)
        try:
            os.rename(work, dest)
        except OSError as exc:  # another create of this machine published its template meanwhile
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(work, ignore_errors=True)
            return TemplateInfo(**json.loads((dest / INFO).read_text()))  # an equivalent one: kept
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return info


def list_all(home: Home) -> list[TemplateInfo]:
    out = []
    for path in sorted(root(home).glob(f"*/{INFO}")) if root(home).is_dir() else []:
        try:
            out.append(TemplateInfo(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # a damaged template is not offered (and never resumed: ``find`` checks it)
    return out


def remove(home: Home, template_id: str) -> None:
    """Remove a template (InvalidArgument for a malformed id, NotFound for an unknown one)."""
    path = root(home) / check_template_id(template_id)
    try:
        _discard(home, path)
    except FileNotFoundError:
        raise NotFound(f"no template {template_id!r}: `boxvm template ls` lists them") from None


def _discard(home: Home, path: Path) -> None:
    """Take a template out of ``templates/`` in one rename (no start finds it after), then
    delete it; boxes resumed from it hold their own links and copies."""
    old = home.staging_dir("template-old-")
    try:
        os.rename(path, old / "t")
    finally:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Warm:
    """A box made to resume from a template (:func:`warm_into`), for :func:`fall_back`."""

    template: Path
    created_at: float  # which template it was (a remade one replaces the directory)
    fresh: dict[str, qcow2.Header]  # the box's own empty deltas, to write again for a cold boot
    t0: float


def warm_into(home: Home, store: Store, box_dir: Path, rec: BoxRecord) -> Warm | None:
    """Make a never-started box resume from its machine's template: its disk deltas
    replaced by the template's, the template's memory linked as a fork's. None (the box
    untouched) if there is no usable template; one that fails its checks (damaged,
    truncated or missing files) is removed, logged, and timed in the box's
    ``warm_fallback_ms``, and the box boots cold."""
    t0 = time.monotonic()
    src = root(home) / key(machine(rec))
    try:
        fresh = {name: qcow2.read_header(box_dir / name) for name in (TOP, GUEST_TOP)}
        if any(qcow2.check(box_dir / name) for name in fresh):  # never over data of the box's own
            return None
        disk = qcow2.chain(box_dir / TOP)
        if len(disk) != 2 or disk[1].parent.parent != Path(os.path.normpath(home.images)):
            # over a layer (snapshotted, restored, a clone, an import's disk): not the image's
            # base disk a template's deltas are over; the template is fine
            return None
    except (OSError, ValueError, StorageError):
        return None
    try:
        info = json.loads((src / INFO).read_text())
    except FileNotFoundError:
        return None  # no template for this machine
    except (OSError, ValueError) as exc:
        _refuse(home, store, rec, src, None, exc, t0)
        return None
    try:
        memory.check(src, {"memory_mib": info["memory_mib"], "cpus": info["cpus"], "guest_bundle": rec.guest_bundle})
        for name, header in fresh.items():  # the same backing files (relative paths at the same depth)
            if qcow2.read_header(src / name).backing_file != header.backing_file:
                raise StorageError(f"its {name} is over another backing file than the box's")
        if json.loads((src / BACKING).read_text()) != _backing_files(box_dir):
            raise StorageError("the image's base disk or the guest bundle was rebuilt since it was made")
        warm = Warm(src, float(info["created_at"]), fresh, t0)
    except (OSError, ValueError, KeyError, TypeError, StorageError) as exc:
        _refuse(home, store, rec, src, info.get("created_at") if isinstance(info, dict) else None, exc, t0)
        return None
    try:
        for name in fresh:
            tmp = box_dir / f"{name}.warm"
            tmp.unlink(missing_ok=True)
            shutil.copyfile(src / name, tmp)
            fsync_files([tmp])  # the guest writes into it next: it must not be torn by a crash
            os.replace(tmp, box_dir / name)
        fsync_dir(box_dir)
        memory.discard(box_dir)
        memory.fork_into(src, box_dir)
        gone = json.loads((src / INFO).read_text()).get("created_at") != info["created_at"]
    except (OSError, ValueError, AttributeError, StorageError):
        gone = True
    if gone:  # removed, or made again, while it was copied (deltas of one, RAM of another): cold, as it was
        _cold_again(box_dir, fresh)
        fsync_dir(box_dir)  # the template's deltas, made durable above, must not come back after a crash
        return None
    return warm


def fall_back(
    home: Home, store: Store, box_dir: Path, rec: BoxRecord, warm: Warm, exc: BaseException, token: float
) -> bool:
    """After the resume of a template failed (``start`` aborted it: the box is ``failed``):
    remove that template, give the box its fresh disks back and leave it ``configured``,
    so that ``start`` boots it cold. False if the box changed meanwhile (removed, stopped,
    or started again: then its failure is another start's, ``token`` being this one's)."""
    _refuse(home, store, rec, warm.template, warm.created_at, exc, warm.t0)
    # Claimed while its files are replaced: a ``failed`` box may be started, and a start
    # landing meanwhile would boot on disks being rewritten under it (starts are refused
    # while a claim stands).
    if not store.begin_operation(rec.id, Operation.RESTORE, frozenset({BoxStatus.FAILED}), os.getpid()):
        return False
    try:
        now = store.get_box(rec.id)
        if now is None or now.started_at != token:
            return False
        _cold_again(box_dir, warm.fresh)
        fsync_dir(box_dir)  # the renames before the record that says the box is cold again
        return store.transition(rec.id, BoxStatus.CONFIGURED, {BoxStatus.FAILED}, during_operation=True, error=None)
    finally:
        store.end_operation(rec.id)


def _refuse(
    home: Home, store: Store, rec: BoxRecord, path: Path, created_at: object, exc: BaseException, t0: float
) -> None:
    """Remove a template that cannot be resumed (not quarantined: nothing could use it, and
    its next user would pay for the failed attempt again; the log says why), unless it was
    remade meanwhile (another ``created_at``: a new template of the machine)."""
    try:
        now = json.loads((path / INFO).read_text()).get("created_at")
    except (OSError, ValueError, AttributeError):
        now = created_at  # its record is the damaged part: it is the one that failed
    if now == created_at:
        with contextlib.suppress(FileNotFoundError):
            _discard(home, path)
    why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    log.warning("boxvm: warm-start template %s of box %r removed, the box boots cold: %s", path.name, rec.name, why)
    store.add_timing(rec.id, warm_fallback_ms=(time.monotonic() - t0) * 1000)


def _cold_again(box_dir: Path, fresh: dict[str, qcow2.Header]) -> None:
    """The box's disk deltas empty again (as ``create`` made them) and no memory state."""
    for name, header in fresh.items():
        (box_dir / f"{name}.warm").unlink(missing_ok=True)  # a copy of the template's cut short
        tmp = box_dir / f"{name}.cold"
        tmp.unlink(missing_ok=True)
        qcow2.write_overlay(tmp, header.size, header.backing_file, header.backing_format or "qcow2")
        os.replace(tmp, box_dir / name)
    memory.discard(box_dir)


def _backing_files(box_dir: Path) -> dict[str, list[int]]:
    """The identity of the files under each delta. A template's RAM holds what its guest
    read from them, so a base disk or bundle rebuilt under the same name (builds are not
    byte-identical; an image removed and pulled again is rebuilt) must not be resumed over:
    the names match, the inode and mtime do not (a hard link keeps both)."""
    out = {}
    for name in (TOP, GUEST_TOP):
        backing = qcow2.read_header(box_dir / name).backing_file
        if backing is None:
            raise StorageError(f"its {name} has no backing file")
        st = os.stat(qcow2.resolve_backing(box_dir / name, backing))
        out[name] = [st.st_ino, st.st_size, st.st_mtime_ns]
    return out


def _allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


class _Backend(Protocol):
    """What :class:`TemplateOps` uses of ``LocalBackend`` (named here: no import cycle)."""

    home: Home
    store: Store

    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo: ...
    async def start(self, box_id: str) -> BoxInfo: ...
    async def suspend(self, box_id: str) -> BoxInfo: ...
    async def remove(self, box_id: str, force: bool) -> None: ...


class TemplateOps:
    """``rt.templates`` on the local backend."""

    async def template_create(self: _Backend, options: BoxOptions) -> TemplateInfo:
        """Boot a box of this machine cold, suspend it as soon as its agent answers, and
        keep it as the machine's template (the box itself is removed)."""
        options = dataclasses.replace(options, warm=False, ports=[], env={}).validate()
        info = await self.create(options, f"template-{secrets.token_hex(4)}")
        try:
            await self.start(info.id)
            await self.suspend(info.id)
            rec = self.store.get_box(info.id)
            if rec is None:
                raise NotFound("the template's box was removed while it was being made")
            return await asyncio.to_thread(adopt, self.home, self.home.box_dir(info.id), rec)
        finally:
            await self.remove(info.id, force=True)

    async def template_list(self: _Backend) -> list[TemplateInfo]:
        return await asyncio.to_thread(list_all, self.home)

    async def template_remove(self: _Backend, template_id: str) -> None:
        await asyncio.to_thread(remove, self.home, template_id)
