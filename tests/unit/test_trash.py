"""The layer store's trash: deletion off the caller's path, after what it depends on is
durable, and start-up recovery of a dead process's trash (real files, a real store)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from boxvm.disks import qcow2
from boxvm.disks.layers import LAYER_SUFFIX, TRASH_PREFIX, LayerStore
from boxvm.paths import Home
from boxvm.processes import alive
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store


def _home(tmp_path: Path) -> tuple[Home, Store, LayerStore]:
    home = Home(tmp_path / "home")
    home.ensure()
    return home, Store(home.db), LayerStore(home)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_collect_moves_at_once_and_deletes_in_the_background(tmp_path: Path) -> None:
    home, store, layers = _home(tmp_path)
    layer = "a" * 16
    qcow2.write_overlay(layers.layer_path(layer), 1 << 20, None)
    with store._tx() as db:  # a layer released by some operation: tombstoned in its transaction
        db.execute("INSERT INTO layer_tombstones VALUES (?)", (layer,))
    assert layers.collect(store, [layer]) == [layer]
    assert not layers.layer_path(layer).exists()  # gone from layers/ when the call returns
    layers.trash.flush()
    assert store.tombstones() == []  # forgotten only after the file is deleted
    trash = [e for e in os.listdir(home.tmp) if e.startswith(TRASH_PREFIX)]
    assert all(os.listdir(home.tmp / e) == [] for e in trash)
    store.close()


def test_recovery_puts_back_what_the_store_still_holds(tmp_path: Path) -> None:
    """A power cut can lose the last commits (WAL, synchronous=NORMAL) but keep the renames
    into the trash made after them: what the store still holds goes back, the rest goes."""
    home, store, layers = _home(tmp_path)
    held, released, box_id, gone_box = "b" * 16, "c" * 16, "d" * 32, "e" * 32
    with store._tx() as db:
        db.execute("INSERT INTO layers VALUES (?, NULL, 1)", (held,))
    store.insert_box(BoxRecord(id=box_id, name="kept", status=BoxStatus.STOPPED, image="x", options={}, mac="m"))
    trash = home.tmp / f"{TRASH_PREFIX}{_dead_pid()}-xyz"
    trash.mkdir()
    qcow2.write_overlay(trash / "T-0123456789abcdef", 1 << 20, None)
    for layer in (held, released):
        qcow2.write_overlay(trash / f"L-{layer}{LAYER_SUFFIX}", 1 << 20, None)
    for box in (box_id, gone_box):
        (trash / f"B-{box}").mkdir()
        qcow2.write_overlay(trash / f"B-{box}" / "disk.qcow2", 1 << 20, None)
    mine = home.tmp / f"{TRASH_PREFIX}{os.getpid()}-abc"  # a live process's trash is its own
    mine.mkdir()
    (mine / "T-x").write_bytes(b"")
    layers.recover_trash(store, alive)
    assert layers.layer_path(held).exists() and not layers.layer_path(released).exists()
    assert (home.box_dir(box_id) / "disk.qcow2").exists() and not home.box_dir(gone_box).exists()
    assert not trash.exists() and (mine / "T-x").exists()
    store.close()
