"""The supervisor's memory-state operations: suspend, and resume instead of a boot.

A mixin of :class:`boxvm.engine.supervisor.Supervisor` (kept here so the supervisor's own
module stays about channels and QEMU's life). ``engine/memory`` does the QMP work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from boxvm import faults
from boxvm.engine import memory
from boxvm.errors import EngineError
from boxvm.status import BoxStatus

if TYPE_CHECKING:
    from boxvm.engine.supervisor import Supervisor

log = logging.getLogger("boxvm.supervisor")

RESUME_PING_TIMEOUT = 30.0


class MemoryOps:
    """Suspend and resume for a :class:`Supervisor` (its attributes are used as they are)."""

    final_status: BoxStatus = BoxStatus.STOPPED  # what QEMU's exit after a requested stop means

    async def op_suspend(self: Supervisor, req: dict[str, Any]) -> dict[str, Any]:
        """Save the memory and device state with the box, then let QEMU exit.

        The capture lock keeps a disk capture from switching the disk meanwhile. If saving
        fails the VM runs on as before (QEMU is told ``cont`` if it was running)."""
        shape = req.get("shape")
        if not isinstance(shape, dict):
            raise EngineError("suspend needs the machine's shape")
        async with self.capture_lock:
            was_running = await self.qmp.status() == "running"
            try:
                timings = await memory.save(self.qmp, self.dir, shape)
            except BaseException:
                await asyncio.to_thread(memory.discard_state, self.dir)
                if was_running:
                    with contextlib.suppress(Exception):
                        await self.qmp.cont()
                raise
            faults.point("suspend:saved")
            self.stop_requested = True
            self.final_status = BoxStatus.SUSPENDED
            t_quit = time.monotonic()
            with contextlib.suppress(Exception):
                await self.qmp.quit()
            try:
                await asyncio.wait_for(self.exited.wait(), 10)
            except TimeoutError:
                if self.qemu is not None and self.qemu.returncode is None:
                    self.qemu.kill()
                await self.exited.wait()
            timings["quit_ms"] = (time.monotonic() - t_quit) * 1000
        return {"ok": True, **timings}

    async def resume_incoming(self: Supervisor) -> None:
        """Load the saved state into the QEMU just started with ``-incoming defer``, run
        it, and check the agent answers; then the box is ready (its agent sends no HELLO:
        it never restarted)."""
        t0 = time.monotonic()
        try:
            load_ms = await memory.load(self.qmp, self.dir)
            await self.qmp.cont()
            # The agent may still hold channels of the previous run: number ours elsewhere.
            self.link.next_gid = (1 << 24) + secrets.randbelow(1 << 30)
            self.link.greeted = True
            pong = await self.link.request({"op": "ping"}, RESUME_PING_TIMEOUT)
            if "error" in pong:
                raise EngineError(f"the guest agent did not answer after the resume: {pong['error']['message']}")
            # The guest's RNG state is a copy of the saved one: mix in fresh host entropy
            # and reseed (an older agent lacks the request: its RNG reseeds only on its own).
            seeded = await self.link.request({"op": "reseed", "entropy": os.urandom(64).hex()}, RESUME_PING_TIMEOUT)
            if "error" in seeded:
                log.warning("the guest RNG was not reseeded: %s", seeded["error"]["message"])
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"resuming the saved memory state failed: {exc}"))
            raise
        ready_ms = (time.monotonic() - self.t0) * 1000
        self.store.transition(self.box_id, BoxStatus.RUNNING, {BoxStatus.STARTING}, error=None)
        self.store.add_timing(
            self.box_id, resume_load_ms=load_ms, resume_ms=(time.monotonic() - t0) * 1000, boot_ms=ready_ms
        )
        if not self.ready.done():
            self.ready.set_result(ready_ms)
