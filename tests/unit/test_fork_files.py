"""The files of forks and warm-start templates without a VM: where a fork's RAM is, what its
check demands, and a template id that cannot name anything outside ``templates/``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from boxvm import templates
from boxvm.engine import memory
from boxvm.errors import InvalidArgument, StorageError
from boxvm.paths import Home

SHAPE = {"memory_mib": 1, "cpus": 1, "guest_bundle": "b" * 16}


def snapshot(directory: Path, ram: str = "file") -> None:
    """A memory snapshot's files: RAM (unless in the stream), device state, record."""
    directory.mkdir()
    state = b"QEVM" + os.urandom(3000)
    if ram == "file":
        memory.blank_ram(directory, 1)
    (directory / memory.STATE).write_bytes(state)
    meta = {"version": 1, "state_bytes": len(state), "state_sha256": hashlib.sha256(state).hexdigest(), "ram": ram}
    (directory / memory.META).write_text(json.dumps(meta | SHAPE))


def test_a_fork_links_the_snapshot_ram_and_checks_it(tmp_path: Path) -> None:
    snapshot(tmp_path / "snap")
    fork = tmp_path / "fork"
    fork.mkdir()
    memory.fork_into(tmp_path / "snap", fork)
    base = fork / memory.BASE
    assert base.stat().st_ino == (tmp_path / "snap" / memory.RAM).stat().st_ino  # a link, not a copy
    assert not (fork / memory.RAM).exists()
    meta = memory.read_meta(fork)
    assert meta["ram"] == "base" and meta["fork"] is True
    memory.check(fork, SHAPE)
    os.truncate(base, 4096)  # the snapshot's RAM is checked through the link
    with pytest.raises(StorageError, match="memory size"):
        memory.check(fork, SHAPE)
    memory.discard(fork)  # a cold boot drops the link, never the snapshot's file
    assert not base.exists() and (tmp_path / "snap" / memory.RAM).exists()


def test_a_stream_state_forks_and_its_size_bound_allows_the_ram(tmp_path: Path) -> None:
    snapshot(tmp_path / "snap", ram="stream")
    fork = tmp_path / "fork"
    fork.mkdir()
    memory.fork_into(tmp_path / "snap", fork)
    assert memory.read_meta(fork)["ram"] == "stream" and not (fork / memory.BASE).exists()
    memory.check(fork, SHAPE)  # no RAM file is needed: it is in the state
    meta = memory.read_meta(fork) | {"ram": "elsewhere"}
    (fork / memory.META).write_text(json.dumps(meta))
    with pytest.raises(StorageError, match="unknown format"):
        memory.check(fork, SHAPE)


def test_template_ids_name_only_templates(tmp_path: Path) -> None:
    home = Home.default(tmp_path)
    home.ensure()
    (tmp_path / "victim").mkdir()
    for bad in ("../victim", "..", "", "0123456789abcdeg", "/etc"):
        with pytest.raises(InvalidArgument):  # not a template id at all (an unknown one is NotFound)
            templates.remove(home, bad)
    assert (tmp_path / "victim").is_dir()
    assert templates.list_all(home) == []
