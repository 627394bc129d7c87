"""Pieces that need no VM: protocol, store migrations, errors, status guard, sync twins, engine choices."""

from __future__ import annotations

import inspect
import sqlite3
from pathlib import Path

import pytest

import boxvm
import boxvm.sync
from boxvm import errors
from boxvm.engine import accel, qemu
from boxvm.guest import protocol as P
from boxvm.status import BoxStatus, require
from boxvm.store import SCHEMA_VERSION, BoxRecord, Store
from boxvm.store.db import MIGRATIONS


def test_protocol_round_trip_across_arbitrary_splits() -> None:
    frames = [P.pack_json(1, P.OPEN, {"op": "exec"}), P.pack(2, P.STDOUT, b"x" * 70000), P.pack_credit(3, 12345)]
    blob = b"".join(frames)
    for step in (1, 7, 4096, len(blob)):
        decoder, got = P.Decoder(), []
        for i in range(0, len(blob), step):
            got += decoder.feed(blob[i : i + step])
        assert [(c, t) for c, t, _ in got] == [(1, P.OPEN), (2, P.STDOUT), (3, P.CREDIT)]
        assert got[1][2] == b"x" * 70000 and P.unpack_credit(got[2][2]) == 12345


def test_protocol_refuses_oversized_frames() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        P.Decoder().feed(P.HEADER.pack(P.MAX_PAYLOAD + 1, 1, P.STDOUT))


def test_errors_round_trip_by_code() -> None:
    for cls in (errors.NotFound, errors.InvalidState, errors.ArchiveError, errors.StorageError):
        exc = cls("box 'x' is gone")
        back = errors.from_dict(exc.to_dict())
        assert type(back) is cls and back.message == exc.message
        assert exc.to_dict()["status"] == cls.http_status
    assert errors.InvalidArgument.http_status == 400 and errors.Unauthorized.http_status == 401


def test_status_guard_names_box_status_and_remedy() -> None:
    with pytest.raises(errors.InvalidState, match="cannot exec box 'dev' while it is stopped: start it first"):
        require("exec", "dev", BoxStatus.STOPPED)
    require("exec", "dev", BoxStatus.RUNNING)
    assert BoxStatus.RUNNING == "running" and BoxStatus.SNAPSHOTTING.is_transient


def _v1_database(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO boxes (id, name, status, image, options, created_at, mac) "
        "VALUES ('abc123', 'old', 'stopped', 'boxvm/default', '{}', 1.0, '52:54:00:00:00:01')"
    )
    db.commit()
    db.close()


def test_store_migrates_an_older_schema_forward(tmp_path: Path) -> None:
    path = tmp_path / "boxvm.db"
    _v1_database(path)
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION == 9
    rec = store.get_box("old")
    assert rec is not None and rec.status == BoxStatus.STOPPED and rec.timings == {}
    store.add_timing("abc123", start_ms=12.5)
    assert store.get_box("abc123").timings == {"start_ms": 12.5}  # type: ignore[union-attr]
    store.close()
    assert Store(path).schema_version == SCHEMA_VERSION  # idempotent


def test_store_refuses_a_newer_schema_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "boxvm.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(errors.StorageError, match=r"schema version 99.*upgrade boxvm"):
        Store(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta").fetchone()[0] == "99"


def test_store_transition_is_compare_and_set(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.insert_box(BoxRecord("id1", "one", BoxStatus.STOPPED, "img", {}, "52:54:00:00:00:02"))
    assert store.transition("id1", BoxStatus.STARTING, {BoxStatus.STOPPED})
    assert not store.transition("id1", BoxStatus.STARTING, {BoxStatus.STOPPED})
    with pytest.raises(errors.AlreadyExists):
        store.insert_box(BoxRecord("id2", "one", BoxStatus.STOPPED, "img", {}, "52:54:00:00:00:03"))


def test_every_public_async_method_has_a_blocking_twin() -> None:
    pairs = [
        (boxvm.Runtime, boxvm.sync.Runtime),
        (boxvm.Box, boxvm.sync.Box),
        (boxvm.Process, boxvm.sync.Process),
        (boxvm.SnapshotHandle, boxvm.sync.SnapshotHandle),
    ]
    for async_cls, sync_cls in pairs:
        for name, method in inspect.getmembers(async_cls, inspect.iscoroutinefunction):
            if name.startswith("_"):
                continue
            twin = getattr(sync_cls, name, None)
            assert twin is not None, f"boxvm.sync.{sync_cls.__name__}.{name} is missing"
            assert not inspect.iscoroutinefunction(twin)
            assert inspect.signature(twin).parameters.keys() == inspect.signature(method).parameters.keys()


def test_acceleration_needs_hardware_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_cpu_flags", lambda: {"fpu", "sse2"})
    choice = accel.detect("auto")
    assert choice.name == "tcg" and "vmx/svm" in choice.reason
    with pytest.raises(errors.EngineError, match="no usable hardware virtualization"):
        accel.detect("kvm")
    assert accel.detect("tcg").name == "tcg"


def _spec(tmp_path: Path, **kw: object) -> qemu.VmSpec:
    base = dict(
        box_dir=tmp_path, kernel=tmp_path / "k", initramfs=tmp_path / "i", disk=tmp_path / "d",
        guest_disk=tmp_path / "g", cpus=2, memory_mib=256, network="nat", ports=[(8080, 80)],
        mac="52:54:00:aa:bb:cc", hostname="box1", machine_id="ab" * 16, tsc_khz=2_445_426,
    )  # fmt: skip
    base.update(kw)
    return qemu.VmSpec(**base)  # type: ignore[arg-type]


def test_qemu_command_line(tmp_path: Path) -> None:
    args = qemu.argv(_spec(tmp_path), accel.Accel("tcg", ""))
    cmdline = args[args.index("-append") + 1]
    assert "tsc_early_khz=2445426" in cmdline and "boxvm.hostname=box1" in cmdline
    assert args[args.index("-accel") + 1] == "tcg" and args[args.index("-smp") + 1] == "2"
    assert any("hostfwd=tcp:127.0.0.1:8080-:80" in a for a in args)
    kvm = qemu.argv(_spec(tmp_path, network="none", ports=[]), accel.Accel("kvm", ""))
    assert "tsc_early_khz" not in kvm[kvm.index("-append") + 1]
    assert not any("netdev" in a for a in kvm) and kvm[kvm.index("-cpu") + 1] == "host"
    # A QEMU loading the devices alone (memory.has_configuration False) is told what not to expect.
    assert "-global" not in args and "suppress-vmdesc" not in args[args.index("-M") + 1]
    devices = qemu.argv(_spec(tmp_path, incoming=True, send_configuration=False), accel.Accel("tcg", ""))
    assert devices[devices.index("-global") + 1] == "migration.send-configuration=off"
    assert devices[devices.index("-M") + 1].endswith(",suppress-vmdesc=on")


def test_id_prefix_lookup_is_literal(tmp_path: Path) -> None:
    """Unique hex id prefixes find a box; '_' or '%' are never wildcards."""
    store = Store(tmp_path / "db")
    store.insert_box(BoxRecord("abc123" + "0" * 26, "one", BoxStatus.STOPPED, "img", {}, "52:54:00:00:00:04"))
    assert store.get_box("abc123").name == "one"  # type: ignore[union-attr]
    assert store.get_box("abc_23") is None and store.get_box("abc%") is None and store.get_box("ab%123") is None


@pytest.mark.parametrize("name", ["box\n", "a\nb", "snap\r", "x" * 129, "", ".hidden", "-x"])
def test_names_with_line_breaks_or_bad_shapes_are_refused(name: str) -> None:
    """``$`` in a pattern accepts one final newline; names are matched whole."""
    from boxvm.options import check_name

    with pytest.raises(errors.InvalidArgument):
        check_name(name)


@pytest.mark.parametrize("name", ["snap\n", "a\nb", ".x", ""])
def test_snapshot_names_with_line_breaks_are_refused(name: str) -> None:
    from boxvm.options import check_snapshot_name

    with pytest.raises(errors.InvalidArgument):
        check_snapshot_name(name)


@pytest.mark.parametrize(
    "ref", ["alpine:3.19\n", "library/alpine\n/x", "localhost:5000\n/x:1", "a@sha256:" + "0" * 64 + "\n"]
)
def test_image_references_with_line_breaks_are_refused(ref: str) -> None:
    from boxvm.images.reference import parse

    with pytest.raises(errors.ImageError):
        parse(ref)
