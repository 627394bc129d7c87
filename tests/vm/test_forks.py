"""Forks from a memory snapshot (issue 15): clones that resume running, re-identified.

One parent per backend (slim image, 256 MiB) runs a background counter; its memory
snapshot is made to look two minutes old (the guest clock is set back first), then forked.
"Resumed, not booted" is judged by the guest kernel's boot_id, which is new at every boot.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

import boxvm
from boxvm.errors import InvalidArgument, InvalidState
from boxvm.options import BoxOptions, CloneOptions, SnapshotOptions
from boxvm.paths import Home
from boxvm.status import BoxStatus
from tests.helpers import started

pytestmark = [pytest.mark.asyncio]

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done"
SMALL = BoxOptions(image="boxvm/slim", memory_mib=256)
BOOT_COUNT = "cat /proc/sys/kernel/random/boot_id /tmp/count"  # new at every boot; the parent's counter


async def sh(box: boxvm.Box, script: str) -> str:
    result = await box.exec(["sh", "-c", script])
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


async def clock_error(box: boxvm.Box) -> float:
    """How far the guest's wall clock is from the host's at least (the slim image's date
    reads whole seconds: a reading G means G <= guest < G + 1, taken within [t0, t1])."""
    t0 = time.time()
    whole = int(await sh(box, "date +%s"))
    t1 = time.time()
    return max(0.0, whole - t1, t0 - (whole + 1))


@dataclass
class Parent:
    box: boxvm.Box
    boot_id: str
    count: int  # the counter when the snapshot was taken (at least)


@pytest_asyncio.fixture(scope="module")
async def parent(home: Home) -> AsyncIterator[Parent]:
    """One parent for both backends: the REST server serves the same home, so a remote
    runtime sees it too (tests act on it through ``rt.get``)."""
    async with boxvm.Runtime(home.root) as local_rt:
        box = await local_rt.create(SMALL, name=f"fork-parent-{os.urandom(2).hex()}")
        await box.start()
        await sh(box, f"nohup sh -c '{COUNTER}' >/dev/null 2>&1 & {started('/tmp/count')}; echo parent > /tmp/who")
        boot_id, count = (await sh(box, "cat /proc/sys/kernel/random/boot_id /tmp/count")).split()
        # An old snapshot without waiting: the guest's clock is two minutes behind in it.
        await sh(box, "date -s @$(( $(date +%s) - 120 )) >/dev/null")
        info = await box.snapshot.create("m", SnapshotOptions(memory=True))
        assert info.has_memory
        yield Parent(box, boot_id, int(count))
        await local_rt.remove(box.id, force=True)


async def via(rt: boxvm.Runtime, parent: Parent) -> boxvm.Box:
    box = await rt.get(parent.box.id)
    assert box is not None
    return box


@pytest.mark.backends("local", "remote")
async def test_forks_resume_diverge_and_are_reidentified(
    rt: boxvm.Runtime, parent: Parent, backend_kind: str, home: Home
) -> None:
    ram = home.box_dir(parent.box.id) / "memory-snapshots"
    ram_file = next(ram.glob("*/memory.ram")) if backend_kind == "local" else None
    ram_digest = hashlib.sha256(ram_file.read_bytes()).hexdigest() if ram_file else None
    t0 = time.monotonic()
    source = await via(rt, parent)
    forks = await source.clone_many(3, options=CloneOptions(from_snapshot="m", start_after_clone=True))
    elapsed = time.monotonic() - t0
    try:
        assert all(f.status == BoxStatus.RUNNING for f in forks)
        readings = await asyncio.gather(
            *(
                sh(f, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/boot_id"
                   " /tmp/count /tmp/who; hostname; cat /etc/machine-id")
                for f in forks
            )
        )  # fmt: skip
        randoms = set()
        for fork, out in zip(forks, readings, strict=True):
            random, boot_id, count, who, hostname, machine_id = out.split()
            assert boot_id == parent.boot_id, "the fork booted instead of resuming the snapshot"
            assert int(count) >= parent.count and who == "parent", "the snapshot's processes and files are gone"
            assert hostname == fork.name and machine_id == fork.id, "the fork kept its parent's identity"
            randoms.add(random)
            assert abs(await clock_error(fork)) < 1.0, "the fork's clock was not set from the host's"
        assert len(randoms) == 3, "two forks read the same random bytes: the guest RNG was not reseeded"
        # They diverge: each writes its own file and keeps counting on its own.
        await asyncio.gather(*(sh(f, f"echo {f.name} > /tmp/who") for f in forks))
        await asyncio.sleep(0.3)
        after = await asyncio.gather(*(sh(f, "cat /tmp/who /tmp/count") for f in forks))
        for fork, out, before in zip(forks, after, readings, strict=True):
            who, count = out.split()
            assert who == fork.name and int(count) > int(before.split()[2]), "the fork's counter stopped"
        if ram_file is not None:  # forks map the snapshot's RAM privately: never written
            assert hashlib.sha256(ram_file.read_bytes()).hexdigest() == ram_digest
        print(f"3 forks to running: {elapsed:.2f} s ({backend_kind})")
    finally:
        await asyncio.gather(*(rt.remove(f.id, force=True) for f in forks))


async def test_the_ray_runner_resumes_clones_of_a_memory_snapshot(parent: Parent, home: Home) -> None:
    """``boxvm.ray``'s runner (here without a Ray cluster; ``BoxRef.clone_many`` and
    ``BoxPool.clone`` call it) clones a memory snapshot started: the clones resume its
    processes (the parent's boot, its counter going on), as ``clone_many`` does, instead of
    booting their disks cold."""
    from boxvm.ray.runner import Runner

    runner = Runner(str(home.root), "test-node", 64, 1 << 16)  # room beside the home's other running boxes
    infos = await runner.clone(parent.box.id, [None, None], CloneOptions(from_snapshot="m", start_after_clone=True))
    try:
        assert [i.status for i in infos] == [BoxStatus.RUNNING] * 2
        async with boxvm.Runtime(home.root) as rt:
            for info in infos:
                clone = await rt.get(info.id)
                assert clone is not None
                boot_id, count = (await sh(clone, "cat /proc/sys/kernel/random/boot_id /tmp/count")).split()
                assert boot_id == parent.boot_id and int(count) >= parent.count, "the clone booted cold"
        assert runner._held == {}  # the room reserved for them went back once they ran
    finally:
        for info in infos:
            await runner.remove(info.id, True)
        await runner.close("test", False)


async def test_a_fork_snapshots_suspends_and_resumes_as_itself(
    rt: boxvm.Runtime, parent: Parent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork's RAM is private (no file holds it). This fork's supervisor is told to give
    the live pre-copy no time (``BOXVM_PRECOPY_MAX_S=0``, as under TCG): its own memory
    snapshot and its suspend copy the pages it wrote over a copy of its snapshot's RAM file
    with the guest stopped (the box's timings say so), and it resumes from either with a
    RAM file of its own. (The live path: test_memory's busy guest under KVM.)"""
    monkeypatch.setenv("BOXVM_PRECOPY_MAX_S", "0")  # inherited by the fork's supervisor only
    fork = await (await via(rt, parent)).clone("fork-own", CloneOptions(from_snapshot="m", start_after_clone=True))
    monkeypatch.delenv("BOXVM_PRECOPY_MAX_S")
    try:
        # A plain suspend and start of the same box is not re-identified: a hostname set
        # in the guest survives it.
        await sh(fork, "hostname renamed-inside; echo mine > /tmp/who")
        assert (await fork.snapshot.create("own", SnapshotOptions(memory=True))).has_memory
        assert (await fork.info()).timings["memory_snapshot_written_mib"] > 0
        await sh(fork, "echo later > /tmp/who")
        _, before = (await sh(fork, "cat /proc/sys/kernel/random/boot_id /tmp/count")).split()
        suspended = await fork.suspend()
        assert suspended.status == BoxStatus.SUSPENDED and suspended.timings["suspend_written_mib"] > 0
        await fork.start()
        out = await sh(fork, "hostname; cat /tmp/who /proc/sys/kernel/random/boot_id /tmp/count")
        hostname, who, boot_id, count = out.split()
        assert (hostname, who, boot_id) == ("renamed-inside", "later", parent.boot_id)
        assert int(count) >= int(before)
        assert await clock_error(fork) < 1.0
        await fork.stop()
        assert (await fork.snapshot.restore("own")).status == BoxStatus.SUSPENDED
        await fork.start()
        assert (await sh(fork, "hostname; cat /tmp/who")).split() == ["renamed-inside", "mine"]
    finally:
        await rt.remove(fork.id, force=True)


async def test_start_after_clone_needs_a_memory_snapshot(rt: boxvm.Runtime, parent: Parent) -> None:
    source = await via(rt, parent)
    with pytest.raises(InvalidArgument, match="memory snapshot"):
        await source.clone(options=CloneOptions(start_after_clone=True))
    await source.snapshot.create("disk-only")
    with pytest.raises(InvalidArgument, match="memory snapshot"):
        await source.clone(options=CloneOptions(from_snapshot="disk-only", start_after_clone=True))
    assert not [b for b in await rt.list() if b.name.startswith(f"{parent.box.name}-")]


async def test_a_suspended_box_is_snapshotted_with_its_memory(rt: boxvm.Runtime, parent: Parent) -> None:
    """A memory snapshot of a suspended box (beyond the SPEC's running box): its disk at
    rest and a copy of its saved state. Forks of it resume the processes; the box stays
    suspended and still resumes from its own state. Its disk alone is still refused: it
    would drop the processes."""
    fork = await (await via(rt, parent)).clone("fork-held", CloneOptions(from_snapshot="m", start_after_clone=True))
    copy = None
    try:
        await sh(fork, "echo held > /tmp/who")
        await fork.suspend()
        with pytest.raises(InvalidState, match="snapshot it with memory=True"):
            await fork.snapshot.create("disk-only")
        assert (await fork.snapshot.create("held", SnapshotOptions(memory=True))).has_memory
        assert (await fork.info()).status == BoxStatus.SUSPENDED
        (copy,) = await fork.clone_many(1, CloneOptions(from_snapshot="held", start_after_clone=True))
        boot_id, count, who, host = (await sh(copy, f"{BOOT_COUNT} /tmp/who; hostname")).split()
        assert (boot_id, who, host) == (parent.boot_id, "held", copy.name) and int(count) >= parent.count
        assert (await fork.start()).status == BoxStatus.RUNNING
        boot_id, who = (await sh(fork, "cat /proc/sys/kernel/random/boot_id /tmp/who")).split()
        assert (boot_id, who) == (parent.boot_id, "held"), "the suspended box lost its own state"
    finally:
        for box in (copy, fork):
            if box is not None:
                await rt.remove(box.id, force=True)


async def test_a_published_memory_snapshot_is_forked_resumed(parent: Parent, home: Home, tmp_path: Path) -> None:
    """``boxvm.ray``'s publish of a memory snapshot and fork of it (its runner without a Ray
    cluster; ``BoxPool.publish``/``fork`` call these): the archive carries the snapshot's
    memory (its transient clone is a fork never run), each node's seed keeps it in a memory
    snapshot, and the forks resume the parent's processes instead of booting its disk."""
    from boxvm.ray.runner import Runner, seed_name

    url = str(tmp_path / "published.boxsnap")
    runner = Runner(str(home.root), "test-node", 64, 1 << 16)
    infos = []
    try:
        await runner.export(parent.box.id, url, "m")
        infos = await runner.fork(url, [None, None], True, "t1")
        assert [i.status for i in infos] == [BoxStatus.RUNNING] * 2
        async with boxvm.Runtime(home.root) as rt:
            for info in infos:
                fork = await rt.get(info.id)
                assert fork is not None
                boot_id, count, host = (await sh(fork, f"{BOOT_COUNT}; hostname")).split()
                assert boot_id == parent.boot_id and int(count) >= parent.count, "the fork booted cold"
                assert host == info.name  # re-identified
            seed = await rt.get(seed_name(url))
            assert seed is not None and (await seed.info()).status == BoxStatus.SUSPENDED
            assert not [b for b in await rt.list() if b.name.startswith(f"{parent.box.name}-")]  # no twin left
    finally:
        for info in infos:
            await runner.remove(info.id, True)
        await runner.retire(url)
        await runner.close("test", False)
