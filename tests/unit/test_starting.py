"""The starting window (``boxvm/state/starting.py``): a start whose process died before its
supervisor ran is undone to the status it began from, and recovery's rollback and the
supervisor's registration exclude each other (one compare-and-set on the start's token)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from boxvm.disks.layers import LayerStore
from boxvm.images import ImageStore
from boxvm.paths import Home
from boxvm.progress import silent
from boxvm.state import starting
from boxvm.state.boxes import Boxes
from boxvm.state.context import Context
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store


def _boxes(root: Path) -> Boxes:
    home = Home.default(root)
    home.ensure()
    store = Store(home.db)
    return Boxes(Context(home, store, ImageStore(home, store), LayerStore(home), silent))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _marked(boxes: Boxes, owner: int, age: float = 0.0, recorded: bool = True) -> tuple[str, float]:
    """A suspended box marked ``starting`` by a start of ``owner`` (``age`` seconds ago) whose
    supervisor never registered: what a runner killed at ``start:marked`` leaves."""
    box_id = os.urandom(16).hex()
    rec = BoxRecord(id=box_id, name=f"b-{box_id[:6]}", status=BoxStatus.SUSPENDED, image="x", options={}, mac="m")
    rec.started_at = 1000.0
    boxes.store.insert_box(rec)
    boxes.home.box_dir(box_id).mkdir(parents=True)
    token = time.time() - age
    if recorded:
        starting.record(boxes.home.box_dir(box_id), starting.Start(token, BoxStatus.SUSPENDED, 1000.0, owner))
    assert boxes.store.transition(box_id, BoxStatus.STARTING, {BoxStatus.SUSPENDED}, started_at=token)
    return box_id, token


def test_a_start_whose_process_died_is_undone_at_once_and_its_late_supervisor_is_refused(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, _dead_pid())
    rec = boxes.record(box_id)  # any look at the box (get, list, the next start)
    assert rec.status == BoxStatus.SUSPENDED and rec.started_at == 1000.0 and rec.error is None
    assert not boxes.store.register_supervisor(box_id, token, os.getpid(), None)  # it exits instead of running


def test_a_start_under_way_is_left_alone_and_once_its_supervisor_registered_it_cannot_be_undone(
    tmp_path: Path,
) -> None:
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, os.getpid())  # its process lives: the supervisor may still come
    assert boxes.record(box_id).status == BoxStatus.STARTING
    assert not boxes.store.register_supervisor(box_id, token + 1, os.getpid(), None)  # another start's
    assert boxes.store.register_supervisor(box_id, token, os.getpid(), None)
    assert not boxes.store.roll_back_start(box_id, token, BoxStatus.SUSPENDED, 1000.0)
    assert boxes.store.get_box(box_id).status == BoxStatus.STARTING  # type: ignore[union-attr]


def test_a_start_a_minute_old_that_no_supervisor_took_is_undone_even_if_its_process_lives(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    box_id, _ = _marked(boxes, os.getpid(), age=120)
    assert boxes.record(box_id).status == BoxStatus.SUSPENDED


def test_without_a_record_of_that_start_a_stale_one_fails_as_before(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    box_id, _ = _marked(boxes, _dead_pid(), recorded=False)
    assert boxes.record(box_id).status == BoxStatus.STARTING  # recent: under way, as far as anyone knows
    old, _ = _marked(boxes, _dead_pid(), age=120, recorded=False)
    assert boxes.record(old).status == BoxStatus.FAILED
