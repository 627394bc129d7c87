"""Snapshots and clones with real VMs: restore semantics, point-in-time capture of a
running box under a live writer, clone batches, independence, sharing and reclamation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import boxvm
from boxvm import BoxStatus
from boxvm.backends.local import LocalBackend
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP
from boxvm.status import Operation
from tests.vm.test_qcow2 import check

pytestmark = [pytest.mark.asyncio, pytest.mark.backends("local", "remote")]

# Appends consecutive numbers, each made durable before the next: at any instant the
# file is exactly 1..N, so a capture shows precisely what had been written before it.
WRITER = "i=0; while true; do i=$((i+1)); echo $i >> /root/counter; sync /root/counter; done"


def _layer_files(local: LocalBackend) -> list[Path]:
    return sorted(local.layers.root.glob("*/*.qcow2"))  # type: ignore[attr-defined]


def _judge(path: Path) -> None:
    """``qemu-img check`` of one qcow2 and ``info`` of its chain down to the base. A layer
    gone by then is skipped: the test home is shared, and the other worker's tests remove
    their boxes and snapshots (and a running box's supervisor its released captures)."""
    try:
        check(path)
        info = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", str(path)], capture_output=True)
        assert info.returncode == 0, info.stderr
        assert all(i["format"] == "qcow2" for i in json.loads(info.stdout)[:-1])  # the chain opens to its base
    except AssertionError:
        if path.exists():
            raise


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _lines(box: boxvm.Box, path: str = "/root/counter") -> list[int]:
    r = await box.exec(["cat", path])
    assert r.exit_code == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


async def test_write_snapshot_write_restore(rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend) -> None:
    await fresh_box.start()
    await fresh_box.exec(["sh", "-c", "echo A > /root/a"])
    await fresh_box.stop()
    depth = (await fresh_box.info()).chain_depth
    v1 = await fresh_box.snapshot.create("v1")
    assert v1.consistency == "stopped" and v1.size_bytes > 0 and not v1.has_memory
    assert (await fresh_box.info()).chain_depth == depth + 1
    await fresh_box.start()
    await fresh_box.exec(["sh", "-c", "echo B > /root/b; echo A2 >> /root/a"])
    v2 = await fresh_box.snapshot.create("v2")  # while running
    assert v2.consistency == "frozen"
    await fresh_box.exec(["sh", "-c", "echo C > /root/c"])
    await fresh_box.stop()
    for name, expected in (("v1", b"a\n"), ("v2", b"a\nb\n")):  # each keeps its snapshot (listed below)
        await fresh_box.snapshot.restore(name)
        await fresh_box.start()
        r = await fresh_box.exec(["ls", "/root"])
        assert r.stdout == expected, f"after restoring {name}"
        await fresh_box.stop()
    assert [s.name for s in await fresh_box.snapshot.list()] == ["v1", "v2"]
    assert (await fresh_box.snapshot.get("v2")).consistency == "frozen"  # type: ignore[union-attr]
    assert await fresh_box.snapshot.get("nope") is None
    for path in [*_layer_files(local), local.home.box_dir(fresh_box.id) / TOP]:
        _judge(path)


async def test_running_snapshot_and_clone_are_point_in_time(
    rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend
) -> None:
    await fresh_box.start()
    writer = await fresh_box.spawn(["sh", "-c", WRITER])
    await asyncio.sleep(1.5)
    before = len(await _lines(fresh_box))
    snap = await fresh_box.snapshot.create("live")
    clone = await fresh_box.clone(f"{fresh_box.name}-c")
    after = len(await _lines(fresh_box))
    assert snap.consistency == "frozen" and snap.timings["pause_ms"] > 0
    layer = local.layers.layer_path(local.store.get_snapshot(fresh_box.id, "live").layer)
    digest = _sha(layer)
    await asyncio.sleep(1.5)  # the source keeps writing...
    assert (await fresh_box.info()).status == BoxStatus.RUNNING
    source = await _lines(fresh_box)
    assert len(source) > after
    assert _sha(layer) == digest, "the captured layer was written after the capture"
    writer.kill()
    await writer.wait()

    await clone.start()
    cloned = await _lines(clone)
    await fresh_box.stop()
    await fresh_box.snapshot.restore("live")
    await fresh_box.start()
    restored = await _lines(fresh_box)
    for captured in (restored, cloned):
        assert captured == list(range(1, len(captured) + 1)), "not an intact prefix"
        assert before <= len(captured) <= after, (before, len(captured), after)
        assert captured == source[: len(captured)]
    assert len(restored) <= len(cloned)  # the clone was captured after the snapshot
    # the clone diverges from its source
    await clone.exec(["sh", "-c", "echo only-in-clone > /root/mine"])
    assert (await fresh_box.exec(["test", "-e", "/root/mine"])).exit_code == 1
    assert (await clone.exec(["cat", "/etc/hostname"])).stdout.decode().strip() == clone.name
    ids = {(await b.exec(["cat", "/etc/machine-id"])).stdout for b in (clone, fresh_box)}
    assert len(ids) == 2
    await rt.remove(clone.id, force=True)


@pytest.mark.backends("local")  # over REST: clone_many of a snapshot in test_rest's twenty clients
async def test_ten_clones_from_a_snapshot_boot_and_diverge(
    rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend
) -> None:
    await fresh_box.start()
    await fresh_box.exec(["sh", "-c", "echo base > /root/base"])
    await fresh_box.stop()
    await fresh_box.snapshot.create("gold")
    clones = await fresh_box.clone_many(10, boxvm.CloneOptions(from_snapshot="gold"))
    try:
        assert len({c.id for c in clones}) == 10 and len({c.name for c in clones}) == 10
        infos = [await c.info() for c in clones]
        assert all(i.status == BoxStatus.STOPPED for i in infos)
        macs = {local.store.get_box(c.id).mac for c in clones}
        assert len(macs) == 10
        for group in (clones[:5], clones[5:]):  # five VMs at a time on two cores
            await asyncio.gather(*(c.start() for c in group))
            await asyncio.gather(*(c.exec(["sh", "-c", f"echo {c.name} > /root/who"]) for c in group))
        for c in clones:
            r = await c.exec(["sh", "-c", "cat /root/base /root/who /etc/hostname"])
            assert r.stdout.decode().split() == ["base", c.name, c.name]
        await asyncio.gather(*(c.stop() for c in clones))
    finally:
        for c in clones:
            await rt.remove(c.id, force=True)


@pytest.mark.backends("local")  # the REST path of this operation is covered elsewhere; the suite has a time budget
async def test_removing_source_and_snapshot_keeps_clones_and_space_returns(
    rt: boxvm.Runtime, local: LocalBackend
) -> None:
    src = await rt.create(name="t-share-src")
    await src.start()
    await src.exec(["sh", "-c", "dd if=/dev/urandom of=/root/blob bs=1M count=8 2>/dev/null; sha256sum /root/blob"])
    digest = (await src.exec(["sha256sum", "/root/blob"])).stdout.split()[0]
    await src.stop()
    await src.snapshot.create("s1")
    a = await src.clone("t-share-a")
    b = await src.clone("t-share-b", boxvm.CloneOptions(from_snapshot="s1"))
    full = await src.clone("t-share-full", boxvm.CloneOptions(cow=False))
    usage = await rt.disk_usage()
    assert usage.boxes["t-share-a"][1] >= 8 << 20  # the blob is shared, not copied
    assert usage.boxes["t-share-full"][0] >= 8 << 20 and usage.boxes["t-share-full"][1] == 0
    home = local.home
    shared = {p for c in (a, b) for p in qcow2.chain(home.box_dir(c.id) / TOP) if p.parent.name == "all"}
    src_only = {p for p in qcow2.chain(home.box_dir(src.id) / TOP) if p.parent.name == "all"} - shared
    assert shared
    await src.snapshot.remove("s1")
    await rt.remove(src.id)
    assert await rt.get("t-share-src") is None
    for clone in (a, b, full):
        await clone.start()
        assert (await clone.exec(["sha256sum", "/root/blob"])).stdout.split()[0] == digest
        await clone.stop()
    assert all(p.exists() for p in shared)  # still needed by the clones
    assert not any(p.exists() for p in src_only)  # only the source needed these
    for clone in (a, b, full):
        await rt.remove(clone.id)
    assert not any(p.exists() for p in shared)  # the last user is gone: space reclaimed
    usage = await rt.disk_usage()
    assert not any(n.startswith("t-share") for n in usage.boxes)


@pytest.mark.parametrize("name", ["", "..", ".hidden", "a/b", "x" * 129, "sp ace"])
async def test_snapshot_names_are_validated(fresh_box: boxvm.Box, name: str) -> None:
    with pytest.raises(boxvm.InvalidArgument, match="invalid snapshot name"):
        await fresh_box.snapshot.create(name)
    assert await fresh_box.snapshot.list() == []


async def test_snapshot_name_rules(fresh_box: boxvm.Box) -> None:
    await fresh_box.snapshot.create("x" * 128)
    await fresh_box.snapshot.create("_under-score.1")
    with pytest.raises(boxvm.AlreadyExists, match=r"_under-score\.1"):
        await fresh_box.snapshot.create("_under-score.1")
    with pytest.raises(boxvm.NotFound, match="no snapshot named 'missing'"):
        await fresh_box.snapshot.restore("missing")
    with pytest.raises(boxvm.NotFound):
        await fresh_box.snapshot.remove("missing")
    with pytest.raises(boxvm.InvalidState, match="memory snapshot"):  # (of a box that is not running)
        await fresh_box.snapshot.create("mem", boxvm.SnapshotOptions(memory=True))


async def test_conflicting_state_operations_fail_at_once(
    rt: boxvm.Runtime, shared_box: boxvm.Box, local: LocalBackend, tmp_path: Path
) -> None:
    first, second = await asyncio.gather(
        shared_box.snapshot.create("race-1"), shared_box.snapshot.create("race-2"), return_exceptions=True
    )
    outcomes = sorted([type(first).__name__, type(second).__name__])
    assert outcomes == ["InvalidState", "SnapshotInfo"], (first, second)
    error = first if isinstance(first, Exception) else second
    assert "snapshotting right now" in str(error)
    # a claim held by another live process blocks every state operation and start/stop
    store = local.store
    assert store.begin_operation(shared_box.id, Operation.CLONE, frozenset({BoxStatus.RUNNING}), pid=1)
    try:
        assert (await shared_box.info()).status == BoxStatus.CLONING
        with pytest.raises(boxvm.InvalidState, match="cloning right now"):
            await shared_box.snapshot.create("blocked")
        with pytest.raises(boxvm.InvalidState, match="cloning right now"):
            await shared_box.stop()
        assert (await shared_box.exec(["true"])).exit_code == 0  # execs are not state operations
        with pytest.raises(boxvm.InvalidState, match=r"cannot export .* cloning right now"):
            await shared_box.export(tmp_path / "blocked.boxsnap")
        assert not (tmp_path / "blocked.boxsnap").exists()
    finally:
        store.end_operation(shared_box.id)
    await shared_box.snapshot.remove("race-1") if await shared_box.snapshot.get("race-1") else None
    await shared_box.snapshot.remove("race-2") if await shared_box.snapshot.get("race-2") else None


async def test_restore_of_a_running_box_needs_a_stop(shared_box: boxvm.Box) -> None:
    await shared_box.snapshot.create("r1")
    with pytest.raises(boxvm.InvalidState, match="stop it first"):
        await shared_box.snapshot.restore("r1")
    await shared_box.snapshot.remove("r1")


async def test_quiesce_failure(rt: boxvm.Runtime, shared_box: boxvm.Box) -> None:
    depth = (await shared_box.info()).chain_depth  # (other tests make layers meanwhile)
    await shared_box.exec(["fsfreeze", "--freeze", "/"])  # frozen already: the capture's quiesce cannot succeed
    try:
        with pytest.raises(boxvm.QuiesceError, match="left untouched"):
            await shared_box.snapshot.create("q1")
        assert await shared_box.snapshot.get("q1") is None and (await shared_box.info()).chain_depth == depth
        snap = await shared_box.snapshot.create("q2", boxvm.SnapshotOptions(stop_on_quiesce_fail=False))
        assert snap.consistency == "crash"
    finally:
        await shared_box.exec(["fsfreeze", "--unfreeze", "/"])
    assert (await shared_box.exec(["sh", "-c", "echo ok > /root/after-quiesce"])).exit_code == 0
    await shared_box.snapshot.remove("q2")


async def test_paused_box_snapshot(rt: boxvm.Runtime, fresh_box: boxvm.Box) -> None:
    await fresh_box.start()
    await fresh_box.exec(["sh", "-c", "echo P > /root/p; sync"])
    await fresh_box.pause()
    snap = await fresh_box.snapshot.create("paused")
    assert snap.consistency == "crash"
    assert (await fresh_box.info()).status == BoxStatus.PAUSED
    await fresh_box.resume()
    clone = await fresh_box.clone(f"{fresh_box.name}-pc", boxvm.CloneOptions(from_snapshot="paused"))
    await clone.start()
    assert (await clone.exec(["cat", "/root/p"])).stdout == b"P\n"
    await rt.remove(clone.id, force=True)


async def test_qemu_img_agrees_on_every_layer(rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend) -> None:
    await fresh_box.snapshot.create("one")  # at least this layer exists, whatever ran before
    layer = local.layers.layer_path(local.store.get_snapshot(fresh_box.id, "one").layer)  # type: ignore[union-attr]
    files = _layer_files(local)
    assert layer in files
    for path in files:
        _judge(path)
