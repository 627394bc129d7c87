"""The memory-state files without a VM: the sparse RAM copy and the check that guards a resume."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from boxvm.engine import memory
from boxvm.errors import StorageError

SHAPE = {"memory_mib": 1, "cpus": 1, "guest_bundle": "b" * 16}


def saved_state(box_dir: Path, state: bytes = b"QEVM" + os.urandom(5000)) -> None:
    memory.fresh_ram(box_dir, SHAPE["memory_mib"])
    (box_dir / memory.STATE).write_bytes(state)
    meta = {"version": 1, "state_bytes": len(state), "state_sha256": hashlib.sha256(state).hexdigest(), **SHAPE}
    (box_dir / memory.META).write_text(json.dumps(meta))


def test_sparse_copy_keeps_data_and_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        for offset in (0, 5 << 20, (64 << 20) - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    copied = memory.sparse_copy(src, tmp_path / "copy")
    dst = tmp_path / "copy"
    assert dst.read_bytes() == src.read_bytes()
    assert copied < 1 << 20 and dst.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never over an existing file
        memory.sparse_copy(src, dst)


def test_fresh_ram_is_private_sparse_and_replaces_any_state(tmp_path: Path) -> None:
    saved_state(tmp_path)
    memory.fresh_ram(tmp_path, 4)
    ram = (tmp_path / memory.RAM).stat()
    assert ram.st_size == 4 << 20 and ram.st_blocks == 0 and stat.S_IMODE(ram.st_mode) == 0o600
    assert not (tmp_path / memory.STATE).exists() and not (tmp_path / memory.META).exists()


def test_check_accepts_a_whole_state(tmp_path: Path) -> None:
    saved_state(tmp_path)
    memory.check(tmp_path, SHAPE)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / memory.STATE).write_bytes((d / memory.STATE).read_bytes()[:-1]), "its record says"),
        (lambda d: (d / memory.STATE).write_bytes(b"X" + (d / memory.STATE).read_bytes()[1:]), "checksum"),
        (lambda d: (d / memory.META).unlink(), "missing or unreadable"),
        (lambda d: (d / memory.META).write_text("{"), "missing or unreadable"),
        (lambda d: (d / memory.META).write_text("[]"), "unknown format"),
        (lambda d: os.truncate(d / memory.RAM, 2 << 20), "memory size"),
    ],
)
def test_check_refuses_a_damaged_state(tmp_path: Path, damage: object, message: str) -> None:
    saved_state(tmp_path)
    damage(tmp_path)  # type: ignore[operator]
    with pytest.raises(StorageError, match=message) as err:
        memory.check(tmp_path, SHAPE)
    assert str(tmp_path) not in str(err.value)


def test_check_refuses_a_state_of_another_machine_shape(tmp_path: Path) -> None:
    saved_state(tmp_path)
    with pytest.raises(StorageError, match="cpus=1"):
        memory.check(tmp_path, {**SHAPE, "cpus": 2})
    with pytest.raises(StorageError, match="guest_bundle"):
        memory.check(tmp_path, {**SHAPE, "guest_bundle": "c" * 16})
