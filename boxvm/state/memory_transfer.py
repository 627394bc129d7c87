"""A suspended box's memory state in exports and imports (the ``memory.state`` member).

Export: the saved state must pass the same check a resume does (its RAM is the box's own
file, a fork's base file, or inside the migration stream), and the manifest records
what an importer must match (machine type, memory size, CPUs, guest bundle) plus the QEMU
that saved it. Import: the verified member becomes the new box's saved state only when the
box it becomes has that shape on this host's QEMU; the record written last (``memory.json``)
then vouches for it and the box is ``suspended``, so ``start()`` resumes its processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from boxvm import memarchive
from boxvm.archive import VerifiedArchive
from boxvm.engine import memory, qemucaps
from boxvm.errors import ArchiveError, StorageError
from boxvm.state.memory import shape
from boxvm.store import BoxRecord


def export_plan(box_dir: Path, rec: BoxRecord, cache: Path) -> tuple[memarchive.Plan, dict[str, Any]]:
    """The member and manifest section of a suspended box (claimed: its files cannot change)."""
    want = shape(rec)
    try:
        memory.check(box_dir, want)
    except StorageError as exc:
        raise StorageError(
            f"box {rec.name!r} cannot be exported with its memory: {exc.message}. Start it (it boots cold from its"
            " disk) to export its disk"
        ) from exc
    mode = memory.read_meta(box_dir).get("ram", "file")
    ram = {"file": box_dir / memory.RAM, "base": box_dir / memory.BASE}.get(mode)  # "stream": in the state
    plan = memarchive.plan(box_dir / memory.STATE, ram, int(want["memory_mib"]) << 20)
    section = {**want, "machine": memarchive.MACHINE, "qemu_version": qemucaps.probe(cache).version or None}
    return plan, {k: v for k, v in section.items() if v is not None}


def import_into(work: Path, verified: VerifiedArchive, rec: BoxRecord, cache: Path, label: str) -> None:
    """Make the archive's memory state the saved state of ``rec`` (staged in ``work``), or
    raise: ArchiveError when the box could not resume it, Unsupported when this host cannot."""
    received = verified.memory
    assert received is not None
    want = shape(rec)
    memarchive.require_fits(label, verified.manifest["memory"], want)
    qemucaps.require_memory_state(cache, "import a suspended box")
    if received.ram_bytes != int(want["memory_mib"]) << 20:  # require_fits compared the manifest: belt and braces
        raise ArchiveError(
            f"{label}: its RAM is {received.ram_bytes} bytes, the box would have {want['memory_mib']} MiB"
        )
    if received.ram is not None:
        os.rename(received.ram, work / memory.RAM)
    os.rename(received.state, work / f"{memory.STATE}.tmp")
    # fsyncs, names the state, writes the record last. "fork": the guest is another box's,
    # so its resume re-identifies it (hostname, machine-id) as a fork's does.
    memory.seal(work, {**want, "fork": True}, "file" if received.ram is not None else "stream")
