"""Suspend and resume on the local backend (the host side of ``engine/memory``).

``suspend()`` asks the box's supervisor to save the memory and device state and let QEMU
exit; the supervisor records ``suspended`` when QEMU is gone. ``start()`` of a suspended
box checks the saved state (:func:`resumable`) and starts QEMU with ``-incoming``; the
supervisor loads the state, reseeds the guest's RNG and answers ready, and ``start()``
then steps the guest's wall clock as after any start. A saved state that fails its check
is discarded and the box is left ``stopped`` (it boots cold from its disk).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boxvm.disks.layers import PENDING
from boxvm.engine import memory
from boxvm.errors import InvalidState, StorageError
from boxvm.options import BoxInfo, BoxOptions
from boxvm.status import BoxStatus, require
from boxvm.store import BoxRecord, Store

if TYPE_CHECKING:
    from boxvm.backends.local import LocalBackend


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


class SuspendOps:
    """``suspend`` for :class:`LocalBackend`."""

    async def suspend(self: LocalBackend, box_id: str) -> BoxInfo:
        from boxvm.backends.local import _no_operation, _pid_is

        t0 = time.monotonic()
        rec = self._record(box_id)
        _no_operation(rec)
        require("suspend", rec.name, rec.status)
        if not self.store.transition(rec.id, BoxStatus.SUSPENDING, {rec.status}):
            raise InvalidState(f"box {rec.name!r} changed status while suspending: try again")
        try:
            conn = await self._conn(rec.id, rec.name)
            if (self.home.box_dir(rec.id) / PENDING).exists():  # a capture a crash left half-done
                await conn.request("settle")
            result = await conn.request("suspend", shape=shape(rec))
        except BaseException:
            # Saving failed and the supervisor let the VM run on; if it is gone, the
            # record says failed (the next start boots cold).
            self.store.transition(rec.id, rec.status, {BoxStatus.SUSPENDING})
            self._record(rec.id)
            raise
        await self._drop_conn(rec.id)
        deadline = time.monotonic() + 10  # the supervisor exits right after QEMU
        while rec.supervisor_pid and _pid_is(rec.supervisor_pid, rec.id) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        timings = {f"suspend_{k}": float(v) for k, v in result.items() if k.endswith("_ms")}
        self.store.add_timing(rec.id, suspend_ms=(time.monotonic() - t0) * 1000, **timings)
        return self._info(self._record(rec.id))
