"""Fresh tops (schema v9, docs/ENGINEERING.md "Fresh tops"): the state operations of a box
at rest whose top holds no data make no file durable -- the commit is their one durable
step -- and every reader re-creates a fresh top a crash lost or cut, from the record.
No VM: a home with an empty image base, a stand-in guest bundle and one stopped box."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, PENDING, TOP, LayerStore
from boxvm.images import ImageStore
from boxvm.options import CloneOptions, ExportOptions, SnapshotOptions
from boxvm.paths import Home
from boxvm.progress import silent
from boxvm.state.boxes import Boxes
from boxvm.state.clones import Clones
from boxvm.state.context import Context
from boxvm.state.snapshots import Snapshots
from boxvm.state.transfer import Transfer
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store
from boxvm.store.db import FRESH_BOTH, FRESH_TOP

BOX = "a" * 32
SIZE = 1 << 30
REPO = Path(__file__).resolve().parents[2]


def services(root: Path) -> tuple[Boxes, Snapshots, Clones]:
    home = Home.default(root)
    home.ensure()
    store = Store(home.db)
    boxes = Boxes(Context(home, store, ImageStore(home, store), LayerStore(home), silent))
    snapshots = Snapshots(boxes)
    return boxes, snapshots, Clones(snapshots)


def make_home(root: Path) -> tuple[Boxes, Snapshots, Clones]:
    """A stopped box over an empty image base, with a snapshot 'base' (a capture the long
    way: its top is fresh from then on, as after any capture, restore or clone)."""
    boxes, snapshots, clones = services(root)
    home = boxes.home
    bundle = home.guest / "b1"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"id": "b1", "kernel_version": "6"}))
    with (bundle / "rootfs.ext4").open("wb") as f:
        f.truncate(1 << 20)
    base = home.images / "d" / "base-1g.qcow2"
    base.parent.mkdir()
    qcow2.write_overlay(base, SIZE, None)
    box_dir = home.box_dir(BOX)
    box_dir.mkdir()
    qcow2.write_overlay(box_dir / TOP, SIZE, os.path.relpath(base, box_dir))
    qcow2.write_overlay(box_dir / GUEST_TOP, 1 << 20, os.path.relpath(bundle / "rootfs.ext4", box_dir), "raw")
    rec = BoxRecord(
        id=BOX, name="b", status=BoxStatus.STOPPED, image="x", options={}, mac="52:54:00:00:00:01", guest_bundle="b1"
    )
    boxes.store.insert_box(rec)
    asyncio.run(snapshots.create(BOX, "base", SnapshotOptions()))
    return boxes, snapshots, clones


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the real fsyncs (files and directories) made by the code under test."""
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    yield calls


def fresh_over(boxes: Boxes, box_id: str) -> bool:
    """The box's top is byte for byte an empty overlay over its recorded layer."""
    rec = boxes.store.get_box(box_id)
    assert rec is not None and rec.layer is not None
    return qcow2.is_empty_overlay(boxes.home.box_dir(box_id) / TOP, boxes.layers.reference(rec.layer))


def test_operations_on_a_fresh_box_make_no_file_durable(tmp_path: Path, fsyncs: list[int]) -> None:
    boxes, snapshots, clones = make_home(tmp_path)
    layers_dir = boxes.layers.all
    rec = boxes.store.get_box(BOX)
    assert rec is not None and rec.fresh == FRESH_TOP and fresh_over(boxes, BOX)
    files = set(layers_dir.iterdir())
    fsyncs.clear()

    snap = asyncio.run(snapshots.create(BOX, "s1", SnapshotOptions()))  # the state is the layer below
    assert boxes.store.get_snapshot(BOX, "s1").layer == rec.layer  # type: ignore[union-attr]
    assert snap.container_disk_bytes > 0 and set(layers_dir.iterdir()) == files
    top = boxes.home.box_dir(BOX) / TOP
    inode = top.stat().st_ino
    info = asyncio.run(snapshots.restore(BOX, "base"))  # re-pointed in place, inside the transaction
    assert top.stat().st_ino == inode and fresh_over(boxes, BOX) and info.chain_depth == 3
    assert boxes.store.get_box(BOX).operation is None  # type: ignore[union-attr]
    made = asyncio.run(clones.clone(BOX, ["c1", "c2"], CloneOptions()))
    assert fsyncs == []  # the commits are the only durable steps (WAL, synchronous=NORMAL)
    assert set(layers_dir.iterdir()) == files
    for clone in made:
        assert clone.fresh == FRESH_BOTH and fresh_over(boxes, clone.id)
    boxes.layers.trash.flush()
    assert boxes.check_layers().clean


def damage(kind: str) -> Callable[[Path], None]:
    """What a power cut can leave of a file whose writes were never synced."""
    return {
        "gone": lambda p: p.unlink(),
        "empty": lambda p: os.truncate(p, 0),
        "zeroed header": lambda p: p.write_bytes(b"\0" * p.stat().st_size),
        "cut tables": lambda p: os.truncate(p, 2 * qcow2.CLUSTER),
    }[kind]


@pytest.mark.parametrize("kind", ["gone", "empty", "zeroed header", "cut tables"])
def test_every_reader_recreates_a_lost_fresh_top(tmp_path: Path, kind: str) -> None:
    boxes, snapshots, clones = make_home(tmp_path)
    top = boxes.home.box_dir(BOX) / TOP
    transfer = Transfer(snapshots)
    readers: dict[str, Callable[[], object]] = {
        "scan": boxes.check_layers,
        "restore": lambda: asyncio.run(snapshots.restore(BOX, "base")),  # its long path: the top does not agree
        "start": lambda: boxes.settle_fresh(boxes.store.get_box(BOX)),  # type: ignore[arg-type]
        "export": lambda: asyncio.run(transfer._export(boxes.record(BOX), ExportOptions(), lambda *a: None, None)),
    }
    for name, read in readers.items():
        rec = boxes.store.get_box(BOX)
        if not rec.fresh:  # type: ignore[union-attr]  # (start settled it)
            boxes.store._db.execute("UPDATE boxes SET fresh = 1 WHERE id = ?", (BOX,))
        damage(kind)(top)
        read()
        assert fresh_over(boxes, BOX), name
        if name == "start":  # synced, and recorded as such durably
            assert boxes.store.get_box(BOX).fresh == 0  # type: ignore[union-attr]
    boxes.layers.trash.flush()
    assert boxes.check_layers().clean

    # a clone whose rename into boxes/ a power cut lost: its directory and both tops come back
    (clone,) = asyncio.run(clones.clone(BOX, ["c"], CloneOptions()))
    shutil.rmtree(boxes.home.box_dir(clone.id))
    assert boxes.check_layers().clean
    guest = boxes.home.box_dir(clone.id) / GUEST_TOP
    assert fresh_over(boxes, clone.id) and qcow2.read_header(guest).backing_format == "raw"


def test_a_clone_gets_its_guest_top_at_its_first_start(
    tmp_path: Path, fsyncs: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """A copy-on-write clone is made with its top only; the start before its first boot
    makes its guest top (an empty overlay over the bundle's root), syncs both tops and the
    directories once each, and records it as no longer fresh -- with no crash warning."""
    boxes, _snapshots, clones = make_home(tmp_path)
    (made,) = asyncio.run(clones.clone(BOX, ["c"], CloneOptions()))
    box_dir = boxes.home.box_dir(made.id)
    assert sorted(p.name for p in box_dir.iterdir()) == [TOP] and fresh_over(boxes, made.id)
    fsyncs.clear()
    with caplog.at_level(logging.WARNING, logger="boxvm"):
        boxes.settle_fresh(boxes.store.get_box(made.id))  # type: ignore[arg-type]
    rootfs = boxes.home.guest / "b1" / "rootfs.ext4"
    assert qcow2.is_empty_overlay(box_dir / GUEST_TOP, os.path.relpath(rootfs, box_dir), "raw")
    assert caplog.records == [] and len(fsyncs) == 4  # the two tops, the directory, its entry in boxes/
    assert boxes.store.get_box(made.id).fresh == 0  # type: ignore[union-attr]


def test_a_top_that_is_not_fresh_is_never_recreated(tmp_path: Path) -> None:
    boxes, _snapshots, _clones = make_home(tmp_path)
    boxes.store.settle_fresh(BOX)  # as a start does: from now on the guest writes into it
    top = boxes.home.box_dir(BOX) / TOP
    os.truncate(top, 0)
    scan = boxes.check_layers(repair=True)
    assert scan.unreadable and top.stat().st_size == 0  # reported, never replaced; nothing deleted


def test_doctor_reads_the_record_again_before_recreating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan lists the boxes, then claims each: one started (written) and stopped between
    the two is no longer fresh, and its top -- the guest's data -- is kept."""
    boxes, _snapshots, _clones = make_home(tmp_path)
    stale = boxes.store.list_boxes()
    assert [rec.fresh for rec in stale] == [FRESH_TOP]
    boxes.store.settle_fresh(BOX)  # started meanwhile: the guest writes into the top ...
    top = boxes.home.box_dir(BOX) / TOP
    with top.open("ab") as f:
        f.write(b"guest data" * 100)  # ... which is no longer an empty overlay
    written = top.read_bytes()
    monkeypatch.setattr(boxes.store, "list_boxes", lambda: stale)
    boxes.check_layers()
    assert top.read_bytes() == written


CHILD = """
import asyncio, sys
sys.path.insert(0, {repo!r})
from tests.unit.test_fresh_tops import services
boxes, snapshots, clones = services({root!r})
{code}
"""


def crash_at(root: Path, fault: str, code: str) -> None:
    script = CHILD.format(repo=str(REPO), root=str(root), code=code)
    proc = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "BOXVM_FAULT": fault}, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, f"did not crash at {fault}: {proc.stderr}"


CRASHES = [
    ("restore:repointed", "asyncio.run(snapshots.restore('" + BOX + "', 's1'))", "before"),
    ("restore:committed", "asyncio.run(snapshots.restore('" + BOX + "', 's1'))", "after"),
    ("clone:staged", "asyncio.run(clones.clone('" + BOX + "', ['c1', 'c2'], __import__('boxvm').CloneOptions()))", ""),
    ("clone:renamed", "asyncio.run(clones.clone('" + BOX + "', ['c1', 'c2'], __import__('boxvm').CloneOptions()))", ""),
]


@pytest.mark.parametrize("fault, code, committed", CRASHES, ids=[c[0] for c in CRASHES])
def test_a_crash_around_the_one_commit_loses_nothing(tmp_path: Path, fault: str, code: str, committed: str) -> None:
    boxes, snapshots, _clones = make_home(tmp_path)
    asyncio.run(snapshots.create(BOX, "s1", SnapshotOptions()))
    asyncio.run(snapshots.restore(BOX, "base"))  # so that restoring s1 changes the layer
    before = boxes.store.get_box(BOX)
    s1 = boxes.store.get_snapshot(BOX, "s1")
    assert before is not None and s1 is not None
    boxes.store.close()
    crash_at(tmp_path, fault, code)

    boxes, snapshots, _clones = services(tmp_path)  # as after a restart
    boxes.recover()
    rec = boxes.store.get_box(BOX)
    assert rec is not None and rec.operation is None
    if committed:
        assert rec.layer == (s1.layer if committed == "after" else before.layer)
    else:  # all clones or none
        assert [r.name for r in boxes.store.list_boxes()] in (["b"], ["b", "c1", "c2"])
    assert boxes.check_layers().clean  # re-creates what the crash cut, then every count agrees
    for r in boxes.store.list_boxes():
        assert fresh_over(boxes, r.id), r.name
    asyncio.run(snapshots.restore(BOX, "base"))  # and it works on
    assert fresh_over(boxes, BOX)


@pytest.fixture
def qcow2_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Counts every ``os.open`` of a qcow2 file (name, flags) made by the code under test."""
    calls: list[tuple[str, int]] = []
    real = os.open

    def counted(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if os.fspath(path).endswith(".qcow2"):
            calls.append((os.path.basename(os.fspath(path)), flags))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counted)
    yield calls


def test_restore_and_clone_of_a_fresh_box_do_the_minimum(tmp_path: Path, qcow2_opens: list[tuple[str, int]]) -> None:
    """Restore: one open of the box's top (read, checked, re-pointed) and one write
    transaction. Clone: one read of the source's top, the clone's one new file and one
    write transaction (the source is checked in the clones' own transaction: no pin)."""
    boxes, snapshots, clones = make_home(tmp_path)
    asyncio.run(snapshots.restore(BOX, "base"))  # the process has read the bottom layer's header once
    statements: list[str] = []
    boxes.store._db.set_trace_callback(statements.append)
    qcow2_opens.clear()

    asyncio.run(snapshots.restore(BOX, "base"))
    assert qcow2_opens == [(TOP, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)]
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert fresh_over(boxes, BOX)

    qcow2_opens.clear()
    statements.clear()
    (made,) = asyncio.run(clones.clone(BOX, ["c"], CloneOptions()))
    assert [name for name, _flags in qcow2_opens] == [TOP, TOP]  # the source's, the clone's (its guest top: at start)
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert boxes.store._db.execute("SELECT count(*) FROM layer_pins").fetchone()[0] == 0
    assert fresh_over(boxes, made.id)
    boxes.layers.trash.flush()
    assert boxes.check_layers().clean


def test_a_clone_whose_source_is_restored_meanwhile_is_made_the_long_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pin holds the source's layer while a clone of a fresh box is staged: the clones'
    transaction checks that the box still holds it. A restore in between releases that
    layer (tombstoned, its file deleted); the clone is then made the long way, of the
    box as restored, rather than recorded over a deleted layer."""
    boxes, snapshots, clones = make_home(tmp_path)
    boxes.store.settle_fresh(BOX)  # started: the next capture writes a layer
    asyncio.run(snapshots.create(BOX, "s1", SnapshotOptions()))
    asyncio.run(snapshots.remove(BOX, "s1"))  # its layer is now held by the box alone
    rec = boxes.store.get_box(BOX)
    base = boxes.store.get_snapshot(BOX, "base")
    assert rec is not None and base is not None and rec.fresh and rec.layer != base.layer
    real = boxes.layers.quiet_top

    def read_then_restore(box_dir: Path) -> tuple[int, str | None] | None:
        quiet = real(box_dir)
        monkeypatch.setattr(boxes.layers, "quiet_top", real)
        # a restore by another caller, between the clone's read of the top and its commit
        done = boxes.store.restore_fresh(BOX, "base", frozenset({BoxStatus.STOPPED}), snapshots._repoint)
        assert done is not None and done[2] == [rec.layer]  # the layer the clone was staged over goes
        boxes.layers.collect(boxes.store, done[2])
        boxes.layers.trash.flush()
        return quiet

    monkeypatch.setattr(boxes.layers, "quiet_top", read_then_restore)
    (made,) = asyncio.run(clones.clone(BOX, ["c"], CloneOptions()))
    chain = boxes.store.layer_chain(made.layer)
    assert rec.layer not in chain and chain[1:] == [base.layer]  # a capture of the box as restored
    assert [r.name for r in boxes.store.list_boxes()] == ["b", "c"]
    assert [p.name for p in boxes.home.tmp.iterdir() if not p.name.startswith("trash-")] == []
    boxes.layers.trash.flush()
    assert boxes.check_layers().clean


def test_a_pending_top_beside_a_fresh_one_is_rolled_forward_not_left(tmp_path: Path) -> None:
    """A crash can leave a pending top beside a fresh one (a restore's renames lost, its
    commits not): the in-place restore declines, and the long way rolls the pending top
    forward first, so no stale pending top is left to be rolled over the restored one later."""
    boxes, snapshots, _clones = make_home(tmp_path)
    base = boxes.store.get_snapshot(BOX, "base")
    assert base is not None
    boxes.store.settle_fresh(BOX)  # started: the next capture writes a layer
    asyncio.run(snapshots.create(BOX, "s1", SnapshotOptions()))
    box_dir = boxes.home.box_dir(BOX)
    qcow2.write_overlay(box_dir / PENDING, SIZE, boxes.layers.reference(base.layer))
    asyncio.run(snapshots.restore(BOX, "s1"))
    assert not (box_dir / PENDING).exists() and fresh_over(boxes, BOX)
    assert boxes.store.get_box(BOX).layer == boxes.store.get_snapshot(BOX, "s1").layer  # type: ignore[union-attr]
    boxes.layers.trash.flush()
    assert boxes.check_layers().clean


OLD = "../../layers/all/0123456789abcdef.qcow2"
NEW = "../../layers/all/fedcba9876543210.qcow2"


def _poke(offset: int, data: bytes) -> Callable[[Path], None]:
    def poke(p: Path) -> None:
        with p.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    return poke


HOSTILE: dict[str, Callable[[Path], None]] = {
    "data written": lambda p: p.open("ab").write(b"x" * qcow2.CLUSTER),
    "refcounts changed": _poke(2 * qcow2.CLUSTER, b"\0\2"),
    "name too long": _poke(16, (5000).to_bytes(4, "big")),
    "name outside the header region": _poke(8, (4000).to_bytes(8, "big")),
    "bytes after the name": _poke(1100, b"\1"),
    "size not a multiple of 512": _poke(24, (SIZE + 1).to_bytes(8, "big")),
    "version 2": _poke(4, (2).to_bytes(4, "big")),
    "over another layer": _poke(qcow2.HEADER_LENGTH + 24 + len("../../layers/all/"), b"ff"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_repoint_refuses_a_top_it_did_not_write(tmp_path: Path, kind: str) -> None:
    """The in-place restore writes only over a file that is byte for byte an empty overlay
    over the recorded layer; anything else (a guest's data, a cut or tampered header) is
    left untouched for the long path."""
    top = tmp_path / TOP
    qcow2.write_overlay(top, SIZE, OLD)
    over_old = lambda name: name == OLD  # noqa: E731
    HOSTILE[kind](top)
    before = top.read_bytes()
    assert not qcow2.repoint_empty(top, over_old, NEW)
    assert top.read_bytes() == before


def test_repoint_rewrites_an_empty_overlay_and_follows_no_link(tmp_path: Path) -> None:
    top = tmp_path / TOP
    qcow2.write_overlay(top, SIZE, OLD)
    link = tmp_path / "link.qcow2"
    link.symlink_to(top)
    assert not qcow2.repoint_empty(link, lambda name: name == OLD, NEW)  # O_NOFOLLOW
    assert qcow2.repoint_empty(top, lambda name: name == OLD, NEW)
    assert qcow2.is_empty_overlay(top, NEW) and qcow2.read_header(top).backing_file == NEW
    assert qcow2.repoint_empty(top, lambda name: name == NEW, OLD)  # and back: nothing of NEW's name is left
    assert qcow2.is_empty_overlay(top, OLD)
