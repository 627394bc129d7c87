"""Warm-start templates: a box suspended at agent-ready, kept to resume new boxes from.

A template is made for one machine: (image digest, guest bundle, cpus, memory, network,
disk size) — everything its saved device state and disks depend on. It is a box booted
cold and suspended the moment its agent answered, its files moved into
``templates/<key>/``: the two disk deltas (``disk.qcow2`` over the image's base disk,
``guest-rootfs.qcow2`` over the bundle's root; a few hundred KB of mount metadata), the RAM
file, the device state and ``template.json``. ``templates/`` sits at the depth of
``boxes/``, so the deltas' relative backing paths hold in both.

The first ``start()`` of a box whose machine has a template (and ``BoxOptions.warm``)
copies the two deltas over its own fresh, never-written ones (same backing files: checked)
and links the RAM as a fork's (``engine/memory.fork_into``): it resumes in well under a
second instead of booting, and is re-identified (hostname, machine-id) like any fork.

Files, not store rows: a template refers to nothing in the layer store and nothing refers
to it (a resumed box holds a hard link to its RAM and copies of the rest), so it is
published by one rename and removed by one ``rmtree``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP
from boxvm.engine import memory
from boxvm.errors import NotFound, StorageError
from boxvm.options import BoxInfo, BoxOptions
from boxvm.paths import Home
from boxvm.store import BoxRecord, Store

INFO = "template.json"


@dataclass
class TemplateInfo:
    id: str  # derived from the machine it serves (see ``key``)
    image: str
    image_digest: str
    guest_bundle: str
    cpus: int
    memory_mib: int
    network: str
    disk_size_gb: int
    created_at: float
    size_bytes: int  # allocated bytes of its files (the RAM is sparse)


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
        info = TemplateInfo(id=key(spec), image=rec.image, created_at=time.time(), size_bytes=_allocated(work), **spec)
        (work / INFO).write_text(json.dumps(info.__dict__))
        work.chmod(0o700)
        dest = root(home) / info.id
        if dest.exists():
            old = home.staging_dir("template-old-")
            os.rename(dest, old / "t")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(work, dest)
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
    if not (len(template_id) == 16 and all(c in "0123456789abcdef" for c in template_id)):
        raise NotFound(f"no template {template_id!r:.40}: see rt.templates.list()")
    path = root(home) / template_id
    if not path.is_dir():
        raise NotFound(f"no template {template_id!r}: see rt.templates.list()")
    old = home.staging_dir("template-old-")
    os.rename(path, old / "t")  # gone at once; boxes resumed from it hold their own links
    shutil.rmtree(old, ignore_errors=True)


def warm_into(home: Home, box_dir: Path, rec: BoxRecord) -> bool:
    """Make a never-started box resume from its machine's template: its disk deltas
    replaced by the template's, the template's memory linked as a fork's. False (the box
    untouched) if there is no usable template."""
    src = root(home) / key(machine(rec))
    try:
        info = json.loads((src / INFO).read_text())
        memory.check(src, {"memory_mib": info["memory_mib"], "cpus": info["cpus"], "guest_bundle": rec.guest_bundle})
        for name in (TOP, GUEST_TOP):  # the same backing files (relative paths at the same depth)
            if qcow2.read_header(src / name).backing_file != qcow2.read_header(box_dir / name).backing_file:
                return False
            if qcow2.check(box_dir / name):  # never over data of the box's own (only a fresh box is replaced)
                return False
    except (OSError, ValueError, KeyError, StorageError):
        return False
    for name in (TOP, GUEST_TOP):
        tmp = box_dir / f"{name}.warm"
        tmp.unlink(missing_ok=True)
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, box_dir / name)
    memory.discard(box_dir)
    memory.fork_into(src, box_dir)
    return True


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
