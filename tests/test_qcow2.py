"""The qcow2 writer and layer store, judged by qemu-img (check, info, and real I/O)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from boxvm.disks import qcow2
from boxvm.disks.layers import PENDING, TOP, LayerStore
from boxvm.paths import Home


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def _bytes(size: str) -> int:
    units = {"k": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def qemu_io(path: Path, *commands: str, read_only: bool = False) -> str:
    """Run qemu-io ``read``/``write`` commands on an image: it must open the whole chain,
    and every command must report its full length done (a pattern mismatch fails too)."""
    args = [a for c in commands for a in ("-c", c)]
    proc = subprocess.run(["qemu-io", *(["-r"] if read_only else []), *args, str(path)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "failed" not in out, out
    for command in commands:
        verb, *_pattern, offset, length = command.split()
        n = _bytes(length)
        assert f"{'wrote' if verb == 'write' else 'read'} {n}/{n} bytes at offset {_bytes(offset)}" in out, out
    return out


def check(path: Path) -> dict[str, object]:
    """qemu-img check must find no errors and no leaks."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report.get("check-errors", 0) == 0 and report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    return report


@pytest.mark.parametrize("size", [512, 64 << 20, 4 << 30, (2 << 40) + 512])
def test_overlay_is_valid_at_any_size(tmp_path: Path, size: int) -> None:
    qcow2.write_overlay(tmp_path / "o.qcow2", size, None)
    check(tmp_path / "o.qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "o.qcow2")))
    assert info["virtual-size"] == size and info["format"] == "qcow2"
    assert (tmp_path / "o.qcow2").stat().st_blocks * 512 <= 64 << 10  # sparse: metadata only


def test_overlay_reads_through_to_its_backing_and_takes_writes(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "write -P 0x5a 0 1M")
    qcow2.write_overlay(tmp_path / "top.qcow2", 64 << 20, "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "read -P 0x5a 0 1M", "write -P 0xa5 512k 64k", "read -P 0xa5 512k 64k")
    qemu_io(tmp_path / "top.qcow2", "read -P 0x5a 0 512k", "read -P 0x5a 576k 448k", read_only=True)
    check(tmp_path / "top.qcow2")
    info = json.loads(qemu_img("info", "--output=json", top))
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    header = qcow2.read_header(tmp_path / "top.qcow2")
    assert (header.version, header.backing_file, header.backing_format) == (3, "base.qcow2", "qcow2")
    assert qcow2.chain(tmp_path / "top.qcow2") == [tmp_path / "top.qcow2", base]


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    qcow2.write_overlay(tmp_path / "o.qcow2", 1 << 20, None)
    with pytest.raises(FileExistsError):
        qcow2.write_overlay(tmp_path / "o.qcow2", 1 << 20, None)


def test_reader_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not a qcow2" * 20)
    with pytest.raises(ValueError, match="not a qcow2"):
        qcow2.read_header(tmp_path / "junk")


def _box(home: Home, name: str, base: Path) -> Path:
    box_dir = home.box_dir(name)
    box_dir.mkdir(parents=True)
    qcow2.write_overlay(box_dir / TOP, 64 << 20, str(Path("../..") / base.relative_to(home.root)))
    return box_dir


def test_capture_restore_gc_cycle(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.ensure()
    base = home.images / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    layers = LayerStore(home)
    box = _box(home, "b1", base)
    qemu_io(box / TOP, "write -P 0x11 0 64k")
    v1 = layers.capture(box)
    qemu_io(box / TOP, "write -P 0x22 0 64k")
    v2 = layers.capture(box)
    for path in (box / TOP, layers.layer_path(v1), layers.layer_path(v2)):
        check(path)
    assert qcow2.chain(box / TOP)[1:3] == [layers.layer_path(v2), layers.layer_path(v1)]
    qemu_io(box / TOP, "read -P 0x22 0 64k", read_only=True)
    layers.restore(box, v1)
    qemu_io(box / TOP, "read -P 0x11 0 64k", read_only=True)
    assert sorted(layers.gc([v1])) == [v2]  # v2 is no longer reachable; v1 is (snapshot and box)
    assert layers.gc([]) == []  # v1 is still the box's backing
    (box / TOP).unlink()
    assert layers.gc([]) == [v1]


def test_commit_rolls_a_crashed_capture_forward(tmp_path: Path) -> None:
    """Whatever step a capture died at, commit() leaves a consistent chain with the data."""
    home = Home(tmp_path)
    home.ensure()
    base = home.images / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    layers = LayerStore(home)
    box = _box(home, "b1", base)
    qemu_io(box / TOP, "write -P 0x33 0 64k")
    layer = layers.prepare_capture(box)  # "crash" here: pending written, nothing renamed
    layers.commit(box)
    assert not (box / PENDING).exists() and layers.layer_path(layer).exists()
    assert qcow2.chain(box / TOP)[1] == layers.layer_path(layer)
    qemu_io(box / TOP, "read -P 0x33 0 64k", read_only=True)
    check(box / TOP)


def test_the_judge_fails_on_a_wrong_pattern_or_a_chain_that_does_not_open(tmp_path: Path) -> None:
    qcow2.write_overlay(tmp_path / "top.qcow2", 64 << 20, "missing.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "other.qcow2"), "64M")
    with pytest.raises(AssertionError, match=r"missing\.qcow2"):
        qemu_io(tmp_path / "top.qcow2", "read -P 0 0 64k", read_only=True)
    with pytest.raises(AssertionError, match="Pattern verification failed"):
        qemu_io(tmp_path / "other.qcow2", "read -P 0x5a 0 64k", read_only=True)


def _store(tmp_path: Path) -> tuple[Home, LayerStore, Path]:
    home = Home(tmp_path)
    home.ensure()
    base = home.images / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    return home, LayerStore(home), base


def _orphan(layers: LayerStore) -> Path:
    """A layer nothing uses (garbage collection should take it)."""
    path = layers.layer_path("0rphan")
    path.parent.mkdir()
    qcow2.write_overlay(path, 64 << 20, None)
    return path


def test_gc_fails_closed_on_a_chain_it_cannot_read(tmp_path: Path) -> None:
    """A staged top still being written (not yet a qcow2) may back onto any layer: keep all."""
    home, layers, _base = _store(tmp_path)
    orphan = _orphan(layers)
    staged = home.staging_dir("clone-")
    (staged / TOP).write_bytes(b"")  # write_overlay has created the file, not yet its header
    assert layers.gc([]) == [] and orphan.exists()
    shutil.rmtree(staged)
    broken = _box(home, "b1", home.images / "gone.qcow2")  # a backing file is missing
    assert layers.gc([]) == [] and orphan.exists()
    shutil.rmtree(broken)
    assert layers.gc([]) == ["0rphan"]


def test_gc_is_not_blocked_by_a_capture_in_progress(tmp_path: Path) -> None:
    """A pending top names the layer its box's top is about to become: not a broken chain."""
    home, layers, base = _store(tmp_path)
    box = _box(home, "b1", base)
    v1 = layers.capture(box)
    pending_layer = layers.prepare_capture(box)
    orphan = _orphan(layers)
    assert layers.gc([]) == ["0rphan"] and not orphan.exists()
    layers.commit(box)
    assert qcow2.chain(box / TOP)[1:3] == [layers.layer_path(pending_layer), layers.layer_path(v1)]


def test_publish_refuses_a_staged_box_whose_layer_was_collected(tmp_path: Path) -> None:
    home, layers, base = _store(tmp_path)
    box = _box(home, "b1", base)
    snap = layers.capture(box)
    staged = home.staging_dir("clone-")
    layers.new_top(staged, snap)
    shutil.rmtree(layers.layer_path(snap).parent)  # as a gc after the snapshot's removal
    with pytest.raises(FileNotFoundError):
        layers.publish(staged, home.box_dir("c1"))
    assert not home.box_dir("c1").exists()
    staged2 = home.staging_dir("clone-")
    layers.new_top(staged2, layers.capture(_box(home, "b2", base)))
    layers.publish(staged2, home.box_dir("c2"))
    assert all(p.exists() for p in qcow2.chain(home.box_dir("c2") / TOP))


def test_gc_meanwhile_boxes_come_and_go(tmp_path: Path) -> None:
    """Box directories created and removed during a collection: no error, and the layer
    every box uses is never taken."""
    home, layers, base = _store(tmp_path)
    src = _box(home, "src", base)
    shared = layers.capture(src)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            box = home.box_dir(f"churn{n}")
            try:
                box.mkdir()
                layers.new_top(box, shared)
                (box / "guest-rootfs.qcow2").write_bytes(b"")
                shutil.rmtree(box)
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert shared not in layers.gc([])
            assert layers.layer_path(shared).exists()
    finally:
        stop.set()
        worker.join()
    assert errors == []
