"""The qcow2 writer and layer store, judged by qemu-img (check, info, and real I/O)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from boxvm.disks import qcow2
from boxvm.disks.layers import PENDING, TOP, LayerStore
from boxvm.paths import Home


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


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
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(base)], check=True, capture_output=True)
    qcow2.write_overlay(tmp_path / "top.qcow2", 64 << 20, "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    io = subprocess.run(
        ["qemu-io", "-c", "read -P 0x5a 0 1M", "-c", "write -P 0xa5 512k 64k", "-c", "read -P 0xa5 512k 64k", top],
        capture_output=True,
        text=True,
    )
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout
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
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", str(box / TOP)], check=True, capture_output=True)
    v1 = layers.capture(box)
    subprocess.run(["qemu-io", "-c", "write -P 0x22 0 64k", str(box / TOP)], check=True, capture_output=True)
    v2 = layers.capture(box)
    for path in (box / TOP, layers.layer_path(v1), layers.layer_path(v2)):
        check(path)
    assert qcow2.chain(box / TOP)[1:3] == [layers.layer_path(v2), layers.layer_path(v1)]
    layers.restore(box, v1)
    io = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x11 0 64k", str(box / TOP)], capture_output=True, text=True)
    assert "Pattern verification failed" not in io.stdout
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
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 64k", str(box / TOP)], check=True, capture_output=True)
    layer = layers.prepare_capture(box)  # "crash" here: pending written, nothing renamed
    layers.commit(box)
    assert not (box / PENDING).exists() and layers.layer_path(layer).exists()
    io = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x33 0 64k", str(box / TOP)], capture_output=True, text=True)
    assert "Pattern verification failed" not in io.stdout
    check(box / TOP)
