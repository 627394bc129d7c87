"""Memory state (issue 15): suspend keeps every process, start resumes it, bad state boots cold.

Each test boots real guests. "No reboot" is judged by the guest kernel's boot_id (new at
every boot) and by a background counter that keeps counting from where it was.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.engine import accel, memory
from boxvm.errors import InvalidState, StorageError
from boxvm.options import CloneOptions, SnapshotOptions
from boxvm.state import memory as box_memory
from boxvm.status import BoxStatus
from tests.helpers import started

pytestmark = [pytest.mark.asyncio]


@pytest.fixture
def fresh_box(cold_box: boxvm.Box) -> boxvm.Box:
    """Booted, not resumed from the test home's template: these tests are about a box's own
    RAM file (a warm-started box's RAM is the template's file mapped privately, as a fork's)."""
    return cold_box


# Writes an increasing number to /tmp/count every 50 ms (renamed into place: never half-written).
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done"


async def sh(box: boxvm.Box, script: str) -> str:
    result = await box.exec(["sh", "-c", script])
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


async def start_counter(box: boxvm.Box) -> None:
    await sh(box, f"nohup sh -c '{COUNTER}' >/dev/null 2>&1 & {started('/tmp/count')}")


async def reading(box: boxvm.Box) -> tuple[str, int]:
    out = await sh(box, "cat /proc/sys/kernel/random/boot_id /tmp/count")
    boot_id, count = out.split()
    return boot_id, int(count)


async def guest_clock_error(box: boxvm.Box) -> float:
    """The guest's wall clock minus the host's, bounded by the exec's round trip."""
    t0 = time.time()
    guest = float(await sh(box, "date +%s.%N"))
    t1 = time.time()
    if t0 <= guest <= t1:
        return 0.0
    return guest - t1 if guest > t1 else guest - t0


@pytest.mark.backends("local", "remote")
async def test_processes_survive_suspend_and_start(rt: boxvm.Runtime, fresh_box: boxvm.Box) -> None:
    box = fresh_box
    await box.start()
    await start_counter(box)
    boot_id, before = await reading(box)
    for cycle in range(2):
        # The saved state is made to look two minutes old: the guest's clock is set back
        # before the suspend, so the resume must step it (instead of the test sleeping).
        await sh(box, "date -s @$(( $(date +%s) - 120 )) >/dev/null")
        info = await box.suspend()
        assert info.status == BoxStatus.SUSPENDED
        again = await rt.get(box.id)  # a new handle reads the persisted status
        assert again is not None and again.status == BoxStatus.SUSPENDED
        info = await box.start()
        assert info.status == BoxStatus.RUNNING
        now_boot, after = await reading(box)  # exec works right after every resume
        assert now_boot == boot_id, f"cycle {cycle}: the guest rebooted instead of resuming"
        assert after >= before, f"cycle {cycle}: the counter went back from {before} to {after}"
        assert abs(await guest_clock_error(box)) < 1.0
        await asyncio.sleep(0.5)
        _, later = await reading(box)
        assert later > after, f"cycle {cycle}: the background counter stopped"
        before = later


@pytest.mark.backends("local", "remote")
async def test_suspend_needs_a_running_box(fresh_box: boxvm.Box) -> None:
    with pytest.raises(InvalidState, match="running or paused"):
        await fresh_box.suspend()


async def _disk_marker(box: boxvm.Box) -> str:
    marker = os.urandom(8).hex()
    await sh(box, f"echo {marker} > /root/marker && sync")
    return marker


async def test_damaged_state_leaves_a_stopped_box_that_boots_cold(fresh_box: boxvm.Box, local: LocalBackend) -> None:
    box = fresh_box
    await box.start()
    marker = await _disk_marker(box)
    boot_id = await sh(box, "cat /proc/sys/kernel/random/boot_id")
    await box.suspend()
    state = local.home.box_dir(box.id) / memory.STATE
    os.truncate(state, state.stat().st_size // 2)
    with pytest.raises(StorageError, match=r"cannot resume.*boot it cold") as err:
        await box.start()
    assert str(local.home.root) not in str(err.value)
    assert (await box.info()).status == BoxStatus.STOPPED
    assert not state.exists()
    await box.start()
    assert await sh(box, "cat /root/marker") == marker
    assert await sh(box, "cat /proc/sys/kernel/random/boot_id") != boot_id  # a cold boot


@pytest.mark.parametrize(
    ("point", "warm"),
    [("memory:stopped", False), ("memory:copied", False), ("memory:stopped", True), ("suspend:saved", True)],
)
async def test_sigkill_during_suspend_or_memory_snapshot_leaves_a_box_that_boots_cold(
    rt: boxvm.Runtime, local: LocalBackend, monkeypatch: pytest.MonkeyPatch, point: str, warm: bool
) -> None:
    """``warm``: a warm-started box (private RAM: the template's file copied, then the pages
    the guest wrote over it, into ``memory.ram.tmp``): killed with the guest stopped, or
    once the state is sealed. Whatever the kill left, the box then starts with its disk, and
    no RAM-sized copy stays behind."""
    options = boxvm.BoxOptions(image="boxvm/slim") if warm else boxvm.BoxOptions(warm=False)
    box = await rt.create(options, name=f"t-sigkill-{os.urandom(3).hex()}")
    try:
        await _killed_and_booted_cold(box, local, monkeypatch, point, warm)
    finally:
        await rt.remove(box.id, force=True)


async def _killed_and_booted_cold(
    box: boxvm.Box, local: LocalBackend, monkeypatch: pytest.MonkeyPatch, point: str, warm: bool
) -> None:
    monkeypatch.setenv("BOXVM_FAULT", point)  # inherited by the box's supervisor only
    await box.start()
    monkeypatch.delenv("BOXVM_FAULT")
    assert (local.home.box_dir(box.id) / memory.BASE).exists() == warm  # warm: the template's RAM, mapped privately
    marker = await _disk_marker(box)
    with pytest.raises(boxvm.BoxvmError):
        if point == "memory:copied":
            await box.snapshot.create("m", SnapshotOptions(memory=True))
        else:
            await box.suspend()
    rec = local.store.get_box(box.id)
    assert rec is not None
    for pid in (rec.supervisor_pid, rec.qemu_pid):  # both gone: the supervisor died, QEMU with it
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                for _ in range(200):
                    os.kill(pid, 0)
                    await asyncio.sleep(0.05)
    status = (await box.info()).status
    assert status in (BoxStatus.FAILED, BoxStatus.STOPPED), status
    await box.start()
    assert await sh(box, "cat /root/marker") == marker
    assert not (local.home.box_dir(box.id) / f"{memory.RAM}.tmp").exists()


async def urandom(box: boxvm.Box) -> str:
    return await sh(box, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")


@pytest.mark.backends("local", "remote")
async def test_memory_snapshot_keeps_the_box_running_and_restore_resumes_it(fresh_box: boxvm.Box) -> None:
    box = fresh_box
    await box.start()
    await start_counter(box)
    boot_id, before = await reading(box)
    snap = await box.snapshot.create("m", SnapshotOptions(memory=True))
    assert snap.has_memory and (await box.snapshot.get("m")).has_memory  # type: ignore[union-attr]
    assert (await box.info()).status == BoxStatus.RUNNING
    await sh(box, "echo later > /root/after-snapshot && sync")
    await asyncio.sleep(0.5)
    _, running_on = await reading(box)
    assert running_on > before  # the box kept running
    # A paused box's memory snapshot leaves QEMU unable to save it again until it runs
    # (``postmigrate``): the next is refused, not run by boxvm, and the box stays paused.
    await box.pause()
    await box.snapshot.create("p", SnapshotOptions(memory=True))
    with pytest.raises(InvalidState, match="resume the box"):
        await box.snapshot.create("p2", SnapshotOptions(memory=True))
    with pytest.raises(InvalidState, match="resume the box"):
        await box.suspend()
    assert (await box.info()).status == BoxStatus.PAUSED and await box.snapshot.get("p2") is None
    await box.snapshot.create("d")  # a disk capture works there (QEMU's nodes inactive until the cont)
    await box.resume()
    await sh(box, "echo on > /root/after-resume && sync")  # the disk as switched there takes writes
    await box.stop()
    seen = set()
    for _ in range(2):  # the same saved state, resumed twice: its RNG must not repeat
        info = await box.snapshot.restore("m")
        assert info.status == BoxStatus.SUSPENDED
        await box.start()
        seen.add(await urandom(box))
        now_boot, count = await reading(box)
        assert now_boot == boot_id, "the guest rebooted instead of resuming"
        assert count >= before, (before, count)  # counting on from the snapshot's instant
        missing = await box.exec(["cat", "/root/after-snapshot"])
        assert missing.exit_code != 0, "the disk was not restored to the snapshot's instant"
        assert abs(await guest_clock_error(box)) < 1.0
        await box.stop()
    assert len(seen) == 2, "two resumes of one memory snapshot read the same /dev/urandom bytes"


@pytest.mark.backends("local", "remote")
async def test_memory_snapshot_needs_a_running_box(fresh_box: boxvm.Box) -> None:
    with pytest.raises(InvalidState, match="no memory to capture"):
        await fresh_box.snapshot.create("m", SnapshotOptions(memory=True))
    assert await fresh_box.snapshot.get("m") is None


async def test_damaged_memory_snapshot_restores_the_disk_and_boots_cold(
    fresh_box: boxvm.Box, local: LocalBackend
) -> None:
    box = fresh_box
    await box.start()
    marker = await _disk_marker(box)
    snap = await box.snapshot.create("m", SnapshotOptions(memory=True))
    await box.stop()
    state = box_memory.snapshot_dir(local.home.box_dir(box.id), snap.id) / memory.STATE
    state.write_bytes(state.read_bytes()[:-100])  # truncated
    with pytest.raises(StorageError, match=r"cannot be used.*boot it cold"):
        await box.snapshot.restore("m")
    assert (await box.info()).status == BoxStatus.STOPPED
    await box.start()
    assert await sh(box, "cat /root/marker") == marker


async def test_two_resumes_of_one_saved_state_read_different_random_bytes(
    fresh_box: boxvm.Box, local: LocalBackend
) -> None:
    """The guest's CRNG state is part of the saved RAM: without the reseed through the agent
    both resumes print the same /dev/urandom bytes (checked with the reseed removed)."""
    box = fresh_box
    await box.start()
    await box.suspend()
    box_dir = local.home.box_dir(box.id)
    kept = box_dir / "kept-state"
    kept.mkdir()
    names = (memory.STATE, memory.META, memory.RAM)
    for name in names:
        memory.sparse_copy(box_dir / name, kept / name)
    seen = []
    for _ in range(2):
        await box.start()
        seen.append(await urandom(box))
        await box.stop()
        memory.discard(box_dir)  # the same saved state again
        for name in names:
            memory.sparse_copy(kept / name, box_dir / name)
        assert local.store.transition(box.id, BoxStatus.SUSPENDED, {BoxStatus.STOPPED})
    assert seen[0] != seen[1], "two resumes of one saved state read the same /dev/urandom bytes"


# Rewrites 1 MiB of tmpfs (guest RAM) with fresh random bytes, over and over.
NOISE = "while :; do dd if=/dev/urandom of=/dev/shm/noise bs=64k count=16 2>/dev/null; done"
# One counter in tmpfs (RAM only) then on disk, each renamed into place: at any instant the
# tmpfs one is the disk one or one ahead. sync now and then puts disk writes in flight.
TWIN = (
    "echo $$ > /dev/shm/twin.pid; i=0; while :; do i=$((i+1));"
    " echo $i > /dev/shm/c.new; mv /dev/shm/c.new /dev/shm/c;"
    " echo $i > /root/c.new; mv /root/c.new /root/c;"
    " [ $((i % 10)) = 0 ] && sync; done"
)


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 << 20), fb.read(4 << 20)
            if x != y:
                return False
            if not x:
                return True


async def test_memory_snapshot_ram_is_the_ram_at_the_stop(
    fresh_box: boxvm.Box, local: LocalBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """While a guest process rewrites RAM, the snapshot's RAM file equals the RAM file itself
    at the end of the guest's pause (held there by BOXVM_MEMORY_HOLD): the copy made while the
    guest ran was fixed up (soft-dirty pages), or taken whole at the stop where the kernel
    has no soft-dirty tracking (as here: then this checks the fallback)."""
    box = fresh_box
    hold = tmp_path / "hold"
    monkeypatch.setenv("BOXVM_MEMORY_HOLD", str(hold))  # inherited by the box's supervisor only
    await box.start()
    monkeypatch.delenv("BOXVM_MEMORY_HOLD")
    await sh(box, f"nohup sh -c '{NOISE}' >/dev/null 2>&1 & sleep 0.5")
    snapshot = asyncio.create_task(box.snapshot.create("m", SnapshotOptions(memory=True)))
    for _ in range(1200):
        if hold.exists() or snapshot.done():
            break
        await asyncio.sleep(0.05)
    assert hold.exists(), await snapshot
    box_dir = local.home.box_dir(box.id)
    try:
        assert _same_bytes(box_dir / memory.CAPTURE / memory.RAM, box_dir / memory.RAM)
    finally:
        hold.unlink()
    assert (await snapshot).has_memory


async def test_memory_snapshot_of_a_busy_guest_resumes_consistent(
    rt: boxvm.Runtime, fresh_slim_box: boxvm.Box, local: LocalBackend
) -> None:
    """A counter kept both in RAM (tmpfs) and on disk, written as fast as the guest can,
    agrees with itself after the snapshot is restored: RAM and disk are of one instant.

    The box is warm-started (its RAM is the template's, mapped privately): under KVM its
    memory snapshot is QEMU's live pre-copy with the disk switched at the switch-over, the
    guest running meanwhile (fails if the disk is captured at any other instant); under TCG
    the pages the guest wrote, copied over the template's RAM file with the guest stopped.
    Resumed from it, the box has a RAM file of its own, so its second snapshot is the
    RAM-file copy at a stop."""
    box = fresh_slim_box
    await box.start()
    box_dir = local.home.box_dir(box.id)
    assert (box_dir / memory.BASE).exists(), "not warm-started: no private RAM to test"
    await sh(box, f"nohup sh -c '{TWIN}' >/dev/null 2>&1 & {started('/root/c')}")
    kvm = accel.detect().name == "kvm"
    for name, ram in (("private", "stream" if kvm else "file"), ("own-file", "file")):
        before = int(await sh(box, "cat /root/c"))
        snap = await box.snapshot.create(name, SnapshotOptions(memory=True))
        assert memory.read_meta(box_memory.snapshot_dir(box_dir, snap.id))["ram"] == ram
        timings = (await box.info()).timings
        if name == "private":
            print(f"memory snapshot of private RAM: pause {snap.timings['pause_ms']:.0f} ms, timings {timings}")
            if kvm:  # live where KVM tracks dirty pages (under TCG a live save lost writes)
                assert timings["memory_snapshot_stop_and_copy"] == 0, timings
            else:
                assert timings["memory_snapshot_written_mib"] > 0, timings
        # The disk stays writable after the capture (cont reactivates the block devices).
        assert int(await sh(box, "sync; sleep 0.3; cat /root/c")) > before
        await box.stop()
        await box.snapshot.restore(name)
        await box.start()
        out = await sh(box, "kill -STOP $(cat /dev/shm/twin.pid); cat /root/c /dev/shm/c")
        disk, count = (int(v) for v in out.split())
        assert disk >= before and count - disk in (0, 1), (name, before, disk, count)
        await sh(box, "kill -CONT $(cat /dev/shm/twin.pid)")
    # A fork of the first snapshot (the private RAM's) resumes from it, consistent too.
    fork = await box.clone(f"{box.name}-fork", CloneOptions(from_snapshot="private", start_after_clone=True))
    try:
        out = await sh(fork, "kill -STOP $(cat /dev/shm/twin.pid); cat /root/c /dev/shm/c")
        disk, count = (int(v) for v in out.split())
        assert count - disk in (0, 1), (disk, count)
    finally:
        await rt.remove(fork.id, force=True)
