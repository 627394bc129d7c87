"""Fault injection: a process SIGKILLed between any two steps of create, snapshot,
restore, clone and remove; start-up recovery must leave every box bootable with its
data, no operation claim, no pending top, no orphaned directory or layer."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import boxvm
from boxvm import archive
from boxvm.disks.layers import PENDING, TOP
from boxvm.paths import Home
from boxvm.state.boxes import owner_of
from tests.helpers import released

pytestmark = pytest.mark.asyncio
DATA = b"precious\n"


@pytest_asyncio.fixture(scope="module")
async def template(rt: boxvm.Runtime, worker: str) -> AsyncIterator[boxvm.Box]:
    """A stopped box holding /root/data; each case works on a clone of it."""
    box = await rt.create(name=f"fault-template-{worker}")
    await box.start()
    await box.exec(["sh", "-c", f"printf '{DATA.decode()}' > /root/data"])
    await box.stop()
    yield box
    await rt.remove(box.id, force=True)


def crash(home: Home, fault: str, code: str) -> None:
    """Run ``code`` (with ``rt`` a blocking Runtime) in a child that dies at ``fault``."""
    script = "import boxvm.sync as bs\nrt = bs.Runtime()\n" + textwrap.dedent(code)
    env = {**os.environ, "BOXVM_HOME": str(home.root), "BOXVM_FAULT": fault}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"did not crash at {fault}: {proc.stdout}{proc.stderr}"


async def recovered(home: Home) -> boxvm.Runtime:
    """A new Runtime (as after a restart) and the invariants recovery must restore."""
    fresh = boxvm.Runtime(home.root)
    backend = fresh.backend
    records = {r.id: r for r in backend.store.list_boxes()}  # type: ignore[attr-defined]
    for rec in records.values():
        if rec.operation_pid in (None, os.getpid()) or not _alive(rec.operation_pid):
            assert rec.operation is None, f"{rec.name} still {rec.operation}"
            box_dir = home.box_dir(rec.id)
            assert (box_dir / TOP).exists(), rec.name
            if not rec.status.is_live:  # a running box's supervisor settles its own pending top
                assert not (box_dir / PENDING).exists(), rec.name
    suspects = [e for e in home.boxes.iterdir() if e.name not in records and not _owned_by_live(e)]
    if suspects:  # another worker's remove() deletes the row first and the files right after
        await asyncio.sleep(1)
        records = {r.id: r for r in backend.store.list_boxes()}  # type: ignore[attr-defined]
        for entry in suspects:
            assert not entry.exists() or entry.name in records, f"orphaned box directory {entry.name}"
    assert backend.boxes.gc() == []  # type: ignore[attr-defined]  # recovery already collected everything
    scan = backend.check_layers()  # type: ignore[attr-defined]  # every count and file agrees with the chains
    # Another worker's operation in flight: a deletion's tombstone goes once its files are
    # gone, a capture's new layer (a chain reaches it) gets its row once recorded. What
    # this test's own crash left does not go away by waiting.
    for _ in range(100):
        if not (scan.tombstoned or scan.adopted) or not dataclasses.replace(scan, tombstoned=[], adopted=[]).clean:
            break
        await asyncio.sleep(0.1)
        scan = backend.check_layers()  # type: ignore[attr-defined]
    assert scan.clean, scan
    return fresh


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _owned_by_live(entry: Path) -> bool:
    pid = owner_of(entry)
    return pid is not None and _alive(pid)


def written(rt: boxvm.Runtime, home: Home, box: boxvm.Box) -> None:
    """Make the box's top hold data, as a run of it would (its clone's, capture's or
    restore's top is a fresh empty overlay, whose operations take the one-transaction
    paths the unit tier crashes, tests/unit/test_fresh_tops.py): recorded as not fresh,
    then a copy-on-read through it copies the disk's first clusters into it (the same bytes)."""
    backend = rt.backend
    backend.boxes.settle_fresh(backend.store.get_box(box.id))  # type: ignore[attr-defined]  # as a start does
    top = home.box_dir(box.id) / TOP
    subprocess.run(["qemu-io", "-C", "-f", "qcow2", "-c", "read 0 1M", str(top)], check=True, capture_output=True)


async def boots_with_data(rt: boxvm.Runtime, name: str) -> None:
    box = await rt.get(name)
    assert box is not None, name
    await box.start()
    assert (await box.exec(["cat", "/root/data"])).stdout == DATA
    await box.stop()


CASES = [
    ("snapshot", "capture:pending-written"),
    ("snapshot", "commit:top-moved"),
    ("snapshot", "capture:committed"),
    ("restore", "restore:recorded"),
    ("restore", "restore:pending-written"),
    ("restore", "restore:committed"),
    ("clone", "capture:pending-written"),
    ("clone", "clone:staged"),
    ("clone", "clone:renamed"),
    ("remove", "remove:row-deleted"),
    ("remove", "collect:tombstoned"),  # between the commit that released layers and their deletion
    ("snapshot-remove", "collect:tombstoned"),
    ("snapshot-remove", "snapshot-remove:row-deleted"),
]


@pytest.mark.parametrize("op, fault", CASES, ids=[f"{op}@{fault}" for op, fault in CASES])
async def test_crash_then_recover(rt: boxvm.Runtime, home: Home, template: boxvm.Box, op: str, fault: str) -> None:
    tag = fault.replace(":", "-")[:30]
    box = await template.clone(f"f-{op}-{tag}"[:60])
    name = box.name
    written(rt, home, box)
    if op in ("restore", "snapshot-remove"):
        await box.snapshot.create("s0")
        written(rt, home, box)
    if op in ("remove", "snapshot-remove"):  # layers only this box holds, released by the operation
        await box.snapshot.create("s1")
        await box.snapshot.restore("s0" if op == "snapshot-remove" else "s1")
        written(rt, home, box)
    code = {
        "snapshot": f"rt.get({name!r}).snapshot.create('s1')",
        "restore": f"rt.get({name!r}).snapshot.restore('s0')",
        "clone": f"rt.get({name!r}).clone_many(2, names=[{name + '-c1'!r}, {name + '-c2'!r}])",
        "remove": f"rt.remove({name!r})",
        "snapshot-remove": f"rt.get({name!r}).snapshot.remove('s1')",
    }[op]
    crash(home, fault, code)
    fresh = await recovered(home)
    try:
        survivors = [n for n in (name, f"{name}-c1", f"{name}-c2") if await fresh.get(n) is not None]
        if op == "remove":
            assert survivors == []  # the name went first; recovery finished the job
        else:
            assert name in survivors
        if op == "clone":
            assert survivors in ([name], [name, f"{name}-c1", f"{name}-c2"])  # all clones or none
        for n in survivors:
            await boots_with_data(fresh, n)
        if op == "snapshot-remove":
            assert await (await fresh.get(name)).snapshot.get("s1") is None  # type: ignore[union-attr]
    finally:
        for n in (name, f"{name}-c1", f"{name}-c2"):
            if await fresh.get(n) is not None:
                await fresh.remove(n, force=True)
        await fresh.close()


async def test_crash_during_a_running_capture(rt: boxvm.Runtime, home: Home, template: boxvm.Box) -> None:
    """The client dies once the supervisor made (and recorded) a live capture, before its
    snapshot record: the box keeps running with no pending top, and later captures work."""
    box = await template.clone("f-live-capture")
    await box.start()
    await box.exec(["sh", "-c", "echo before > /root/live"])
    crash(home, "capture:committed", "rt.get('f-live-capture').snapshot.create('s1')")
    fresh = await recovered(home)
    try:
        live = await fresh.get("f-live-capture")
        assert live is not None and (await live.info()).status == boxvm.BoxStatus.RUNNING
        await live.exec(["sh", "-c", "echo after >> /root/live"])
        snap = await live.snapshot.create("s2")
        assert snap.consistency == "frozen"
        await live.stop()
        assert not (home.box_dir(live.id) / PENDING).exists()
        await live.start()
        assert (await live.exec(["cat", "/root/data", "/root/live"])).stdout == DATA + b"before\nafter\n"
    finally:
        await fresh.remove("f-live-capture", force=True)
        await fresh.close()
    await asyncio.sleep(0)


EXPORT_FAULTS = ["export:disk-streamed", "export:written"]


@pytest.mark.parametrize("fault", EXPORT_FAULTS)
@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
async def test_crash_during_export_leaves_nothing_at_the_destination(
    rt: boxvm.Runtime, home: Home, template: boxvm.Box, tmp_path: Path, fault: str, running: bool
) -> None:
    """Killed mid-stream or with every byte written but not yet named: nothing appears at
    the destination or next to it, the source is released and exports again."""
    name = f"f-export-{fault.split(':')[1]}-{'run' if running else 'stop'}"
    box = await template.clone(name)
    if running:
        await box.start()
    dest = tmp_path / "out.boxsnap"
    try:
        crash(home, fault, f"rt.get({name!r}).export({str(dest)!r})")
        if running and fault == "export:written":
            # the stream ended, so the release was asked for: its fold runs on in the box's
            # supervisor, which collects the capture's layer itself when it is done
            await released(box)
        fresh = await recovered(home)
        try:
            assert os.listdir(tmp_path) == []
            again = await (await fresh.get(name)).export(dest)  # type: ignore[union-attr]
            assert again == dest and os.listdir(tmp_path) == ["out.boxsnap"]
            copy = await fresh.import_box(dest, name=f"{name}-copy")
            await boots_with_data(fresh, copy.name)
            await fresh.remove(copy.id)
        finally:
            await fresh.remove(name, force=True)
            await fresh.close()
    finally:
        if await rt.get(name) is not None:
            await rt.remove(name, force=True)


async def test_export_never_replaces_a_file_created_meanwhile(
    rt: boxvm.Runtime, template: boxvm.Box, tmp_path: Path
) -> None:
    """A file that appears at the destination while the archive is written is left alone."""
    dest = tmp_path / "out.boxsnap"
    real_write = archive.write_stream

    def racing_write(*args: object, **kwargs: object) -> dict[str, object]:
        dest.write_bytes(b"someone else's file")
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    archive.write_stream = racing_write  # type: ignore[assignment]
    try:
        with pytest.raises(boxvm.AlreadyExists):
            await template.export(dest)
    finally:
        archive.write_stream = real_write
    assert dest.read_bytes() == b"someone else's file" and os.listdir(tmp_path) == ["out.boxsnap"]
    assert (await template.info()).status == boxvm.BoxStatus.STOPPED
