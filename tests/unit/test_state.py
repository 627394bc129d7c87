"""The state services without a VM: the one staging sequence, the claim's operation in the
store (schema v8) and the guard's message while an operation holds a box."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from boxvm.disks.layers import LayerStore
from boxvm.errors import AlreadyExists, InvalidState
from boxvm.images import ImageStore
from boxvm.paths import Home
from boxvm.progress import silent
from boxvm.state.boxes import OWNER, OWNER_XATTR, Boxes, owner_of
from boxvm.state.context import Context
from boxvm.status import BoxStatus, Operation, require
from boxvm.store import BoxRecord, Store
from boxvm.store.db import MIGRATIONS


def _boxes(root: Path) -> Boxes:
    home = Home.default(root)
    home.ensure()
    store = Store(home.db)
    return Boxes(Context(home, store, ImageStore(home, store), LayerStore(home), silent))


def _record(box_id: str, name: str) -> BoxRecord:
    return BoxRecord(id=box_id, name=name, status=BoxStatus.STOPPED, image="x", options={}, mac="52:54:00:00:00:01")


def test_staging_publishes_then_commits_and_leaves_nothing_when_the_commit_fails(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    home = boxes.home
    with boxes.staging(["a" * 32, "b" * 32], "clone") as stage:
        for work in stage.dirs:
            (work / "disk.qcow2").write_bytes(b"x")
        stage.publish(lambda: boxes.store.insert_boxes([_record("a" * 32, "a"), _record("b" * 32, "b")]))
    assert sorted(p.name for p in home.boxes.iterdir()) == ["a" * 32, "b" * 32]
    assert not any(owner_of(p) for p in home.boxes.iterdir())  # committed: recovery may judge them
    assert list(home.tmp.iterdir()) == []

    with pytest.raises(AlreadyExists), boxes.staging(["c" * 32], "create") as stage:
        stage.publish(lambda: boxes.store.insert_box(_record("c" * 32, "a")))  # the name is taken
    with pytest.raises(RuntimeError), boxes.staging(["d" * 32], "import") as stage:
        raise RuntimeError("the archive failed its check")
    assert sorted(p.name for p in home.boxes.iterdir()) == ["a" * 32, "b" * 32]
    assert list(home.tmp.iterdir()) == []


def test_a_second_staging_of_a_taken_id_fails_and_leaves_the_first_box_whole(tmp_path: Path) -> None:
    """Two imports of one caller-chosen id (a migration's re-run while the first upload is
    still verifying on the target) pass the id check before either commits: the loser's
    undo removes only what it renamed, never the winner's directory."""
    boxes = _boxes(tmp_path)
    box_id = "e" * 32
    with boxes.staging([box_id], "import") as first, boxes.staging([box_id], "import") as second:
        (first.dirs[0] / "top.qcow2").write_bytes(b"winner")
        (second.dirs[0] / "top.qcow2").write_bytes(b"loser")
        first.publish(lambda: boxes.store.insert_box(_record(box_id, "winner")))
        with pytest.raises(AlreadyExists, match="is taken"):
            second.publish(lambda: boxes.store.insert_box(_record(box_id, "loser")))
    assert (boxes.home.box_dir(box_id) / "top.qcow2").read_bytes() == b"winner"
    assert boxes.store.get_box(box_id).name == "winner"
    assert list(boxes.home.tmp.iterdir()) == []


def test_recovery_keeps_a_published_directory_its_live_owner_has_not_committed(tmp_path: Path) -> None:
    """Between the rename into boxes/ and the commit, another process's recovery must leave
    the directory to its owner (named in an xattr, or in the older ``.owner`` file), and
    remove one whose owner died; once committed, the directory names no owner."""
    boxes = _boxes(tmp_path)
    home = boxes.home
    dead = _dead_pid()
    ghost, legacy = home.box_dir("f" * 32), home.box_dir("9" * 32)
    ghost.mkdir()
    os.setxattr(ghost, OWNER_XATTR, str(dead).encode())  # a clone whose process died before its commit
    legacy.mkdir()
    (legacy / OWNER).write_text(str(os.getpid()))  # staged by an older boxvm, still running
    marked = home.box_dir("8" * 32)
    marked.mkdir()
    os.setxattr(marked, OWNER_XATTR, str(dead).encode())  # committed; its process died before it cleared the mark
    boxes.store.insert_box(_record("8" * 32, "marked"))

    def commit() -> None:
        assert owner_of(home.box_dir("a" * 32)) == os.getpid()
        boxes.recover()  # as a process starting up meanwhile
        assert home.box_dir("a" * 32).is_dir() and legacy.is_dir() and not ghost.exists()
        boxes.store.insert_box(_record("a" * 32, "a"))

    with boxes.staging(["a" * 32], "clone") as stage:
        (stage.dirs[0] / "disk.qcow2").write_bytes(b"x")
        stage.publish(commit)
    assert owner_of(home.box_dir("a" * 32)) is None and not stage.owner_files
    assert owner_of(legacy) == os.getpid()
    assert marked.is_dir() and owner_of(marked) is None


@pytest.mark.parametrize("refusal", [errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.ENOSPC])
def test_without_user_xattrs_the_owner_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int) -> None:
    """A filesystem that refuses user xattrs (none here does: the refusal is simulated; an
    LSM's EACCES, ENOSPC where a small inode has no room for one) gets the ``.owner`` file,
    which recovery honours and the commit removes."""
    boxes = _boxes(tmp_path)
    final = boxes.home.box_dir("a" * 32)

    def refused(*_args: object) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "setxattr", refused)

    def commit() -> None:
        assert (final / OWNER).read_text() == str(os.getpid()) and owner_of(final) == os.getpid()
        boxes.recover()
        assert final.is_dir()
        boxes.store.insert_box(_record("a" * 32, "a"))

    with boxes.staging(["a" * 32], "clone") as stage:
        stage.publish(commit)
    assert stage.owner_files and not (final / OWNER).exists() and owner_of(final) is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_v7_claim_reads_as_its_operation_and_is_shown_as_its_status(tmp_path: Path) -> None:
    path = tmp_path / "boxvm.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for step in MIGRATIONS[:7]:
        db.executescript(step)
    db.execute("INSERT INTO meta VALUES ('schema_version', '7')")
    db.execute(
        "INSERT INTO boxes (id, name, status, image, options, created_at, mac, operation, operation_pid) "
        "VALUES ('abc123', 'old', 'stopped', 'x', '{}', 1.0, '52:54:00:00:00:01', 'cloning', 1)"
    )
    db.commit()
    db.close()
    store = Store(path)
    rec = store.get_box("old")
    assert rec is not None and rec.operation == Operation.CLONE and rec.shown_status == BoxStatus.CLONING
    store.end_operation(rec.id)
    assert store.begin_operation(rec.id, Operation.EXPORT, frozenset({BoxStatus.STOPPED}), 1)
    raw = sqlite3.connect(path).execute("SELECT operation FROM boxes").fetchone()[0]
    assert raw == "export"
    with pytest.raises(InvalidState, match="it is exporting right now"):
        require(Operation.START, "old", BoxStatus.STOPPED, Operation.EXPORT)
