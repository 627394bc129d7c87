"""A warm start whose template cannot be resumed boots cold, and the template goes (issue 15).

No VM: a box record with the two empty disk deltas ``create`` makes, and a template made of
real files (qcow2 deltas over the same backing files, a sparse RAM file, a device state
with the record ``engine/memory`` writes) that is then damaged the ways a disk or a crash
damages files. A resume that QEMU itself refuses is tests/vm/test_templates.py's.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from boxvm import templates
from boxvm.cli import main
from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP
from boxvm.engine import memory
from boxvm.options import BoxOptions
from boxvm.paths import Home
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store
from tests.helpers import serving

# The image's base disk and the guest bundle's root, where a box's deltas are over them.
BACKING = {TOP: (f"../../images/{'1' * 64}/base-1g.qcow2", "qcow2"), GUEST_TOP: ("../../guest/rootfs.ext4", "raw")}
SIZE = 1 << 30


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    home = Home.default(tmp_path / "home")
    home.ensure()
    yield home


@pytest.fixture
def store(home: Home) -> Iterator[Store]:
    s = Store(home.db)
    yield s
    s.close()


def fresh_box(home: Home, store: Store) -> tuple[BoxRecord, Path]:
    rec = BoxRecord(
        id=secrets.token_hex(16), name=f"b-{secrets.token_hex(2)}", status=BoxStatus.CONFIGURED, image="img",
        options=BoxOptions(memory_mib=128).to_dict(), mac="52:54:00:00:00:01", image_digest="sha256:" + "1" * 64,
        guest_bundle="bundle",
    )  # fmt: skip
    store.insert_box(rec)
    box_dir = home.box_dir(rec.id)
    box_dir.mkdir(parents=True)
    for name, (backing, fmt) in BACKING.items():
        qcow2.write_overlay(box_dir / name, SIZE, backing, fmt)
    return rec, box_dir


def make_template(home: Home, rec: BoxRecord) -> Path:
    """A template of ``rec``'s machine: deltas with data, RAM with data, a sealed state."""
    work = home.tmp / "t"
    work.mkdir()
    for name, (backing, fmt) in BACKING.items():
        base = qcow2.resolve_backing(work / name, backing)
        if not base.exists():  # the image's base disk and the bundle's root the deltas are over
            base.parent.mkdir(parents=True, exist_ok=True)
            base.write_bytes(b"base")
        qcow2.write_overlay(work / name, SIZE, backing, fmt)
    (work / templates.BACKING).write_text(json.dumps(templates._backing_files(work)))
    with open(work / memory.RAM, "wb") as f:
        f.truncate(128 << 20)
        f.write(b"guest memory")
    (work / f"{memory.STATE}.tmp").write_bytes(os.urandom(50_000))
    memory.seal(work, {"memory_mib": 128, "cpus": 1, "guest_bundle": "bundle"})
    spec = templates.machine(rec)
    info = {"id": templates.key(spec), "image": "img", "created_at": 1.0, "size_bytes": 1, **spec}
    (work / templates.INFO).write_text(json.dumps(info))
    dest = templates.root(home) / info["id"]
    dest.parent.mkdir(exist_ok=True)
    os.rename(work, dest)
    return dest


def is_fresh(box_dir: Path, name: str) -> bool:
    """The delta byte for byte as ``create`` writes it (no data, same backing file)."""
    (box_dir / "expected").unlink(missing_ok=True)
    qcow2.write_overlay(box_dir / "expected", SIZE, *BACKING[name])
    return (box_dir / name).read_bytes() == (box_dir / "expected").read_bytes()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def rebuild(path: Path) -> None:
    """A file made again under its name, as a rebuild publishes it: same name and bytes, new inode."""
    path.with_suffix(".new").write_bytes(path.read_bytes())
    os.replace(path.with_suffix(".new"), path)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "a byte of the device state changed": lambda t: flip_a_byte(t / memory.STATE),
    "the device state truncated": lambda t: os.truncate(t / memory.STATE, 1000),
    "the RAM file missing": lambda t: (t / memory.RAM).unlink(),
    "the RAM file truncated": lambda t: os.truncate(t / memory.RAM, 64 << 20),
    "the state's record missing": lambda t: (t / memory.META).unlink(),
    "the template's record garbage": lambda t: (t / templates.INFO).write_text("{not json"),
    "the template's record not an object": lambda t: (t / templates.INFO).write_text("[1]"),
    "a disk delta missing": lambda t: (t / GUEST_TOP).unlink(),
    "the image's base disk rebuilt since": lambda t: rebuild(t.parent.parent / "images" / ("1" * 64) / "base-1g.qcow2"),
    "the bundle's root rebuilt since": lambda t: rebuild(t.parent.parent / "guest" / "rootfs.ext4"),
    "the backing files' record missing": lambda t: (t / templates.BACKING).unlink(),
    "a disk delta over another backing file": lambda t: (
        (t / TOP).unlink(),
        qcow2.write_overlay(t / TOP, SIZE, "../../layers/all/other.qcow2"),
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_template_is_removed_and_the_box_boots_cold(home: Home, store: Store, damage: str) -> None:
    rec, box_dir = fresh_box(home, store)
    template = make_template(home, rec)
    DAMAGE[damage](template)
    assert templates.warm_into(home, store, box_dir, rec) is None, "a damaged template was resumed"
    assert not template.exists() and templates.list_all(home) == []
    assert "warm_fallback_ms" in (store.get_box(rec.id) or rec).timings  # visible in the box's timings
    assert all(is_fresh(box_dir, name) for name in BACKING)  # the box untouched: it boots cold
    assert not (box_dir / memory.STATE).exists() and not (box_dir / memory.BASE).exists()


def test_a_failed_resume_gives_the_box_its_fresh_disks_back_and_removes_the_template(home: Home, store: Store) -> None:
    """What ``start`` does when QEMU refused a template's state: the box, ``failed`` by the
    aborted start, is ``configured`` again with empty deltas and no memory state."""
    rec, box_dir = fresh_box(home, store)
    template = make_template(home, rec)
    warm = templates.warm_into(home, store, box_dir, rec)
    assert warm is not None and (box_dir / memory.BASE).samefile(template / memory.RAM)
    assert (box_dir / TOP).read_bytes() == (template / TOP).read_bytes()
    store.transition(rec.id, BoxStatus.FAILED, {BoxStatus.CONFIGURED}, error="QEMU refused the state", started_at=7.0)
    # a failure another start left (stopped, started again, failed) is not this start's to undo
    warmed = (box_dir / TOP).read_bytes()
    assert not templates.fall_back(home, store, box_dir, rec, warm, RuntimeError("late"), 6.0)
    assert (box_dir / TOP).read_bytes() == warmed and (box_dir / memory.BASE).exists()
    assert (store.get_box(rec.id) or rec).operation is None
    assert templates.fall_back(home, store, box_dir, rec, warm, RuntimeError("loading the memory state failed"), 7.0)
    after = store.get_box(rec.id)
    assert after is not None and after.status == BoxStatus.CONFIGURED and after.error is None
    assert "warm_fallback_ms" in after.timings and not template.exists()
    assert all(is_fresh(box_dir, name) for name in BACKING)
    assert not any((box_dir / n).exists() for n in (memory.STATE, memory.META, memory.BASE, memory.RAM))


def test_a_template_remade_after_the_failed_resume_is_kept(home: Home, store: Store) -> None:
    rec, box_dir = fresh_box(home, store)
    template = make_template(home, rec)
    warm = templates.warm_into(home, store, box_dir, rec)
    assert warm is not None
    info = json.loads((template / templates.INFO).read_text())
    (template / templates.INFO).write_text(json.dumps({**info, "created_at": 2.0}))  # a new template
    store.transition(rec.id, BoxStatus.FAILED, {BoxStatus.CONFIGURED}, started_at=7.0)
    assert templates.fall_back(home, store, box_dir, rec, warm, RuntimeError("x"), 7.0)
    assert template.exists(), "a template made after the failed resume was removed"


def test_a_template_remade_while_it_is_copied_boots_the_box_cold(
    home: Home, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another create of the machine replaces the template between the copy of its disk
    deltas and the link of its memory: the box would resume one boot's RAM over another's
    disks (the file-system mix of two builds), so it boots cold instead."""
    rec, box_dir = fresh_box(home, store)
    template = make_template(home, rec)
    fork_into = memory.fork_into

    def remade_meanwhile(src: Path, dest: Path) -> None:
        info = json.loads((template / templates.INFO).read_text())
        (template / templates.INFO).write_text(json.dumps({**info, "created_at": 2.0}))
        fork_into(src, dest)

    monkeypatch.setattr(memory, "fork_into", remade_meanwhile)
    assert templates.warm_into(home, store, box_dir, rec) is None
    assert all(is_fresh(box_dir, name) for name in BACKING) and template.exists()
    assert not any((box_dir / n).exists() for n in (memory.STATE, memory.META, memory.BASE, memory.RAM))


@pytest.mark.parametrize("below", ["base.qcow2", None])
def test_a_box_whose_disk_is_over_a_layer_boots_cold_and_keeps_the_template(
    home: Home, store: Store, below: str | None
) -> None:
    """A never-started box after a snapshot or restore, or a clone of one: its empty top is
    over a layer, not the image's disk the template's deltas are over. The box is not warmed,
    and the template -- nothing wrong with it -- stays for the next box. Also when the layer
    backs onto nothing (an imported box's disk: a Ray pool's forks are clones of one), where
    the chain is two files long like a box's over the image."""
    rec, box_dir = fresh_box(home, store)
    template = make_template(home, rec)
    layer = home.root / "layers" / "all" / "0123456789abcdef.qcow2"
    layer.parent.mkdir(parents=True, exist_ok=True)
    qcow2.write_overlay(layer, SIZE, below)
    (box_dir / TOP).unlink()
    qcow2.write_overlay(box_dir / TOP, SIZE, "../../layers/all/0123456789abcdef.qcow2")
    assert templates.warm_into(home, store, box_dir, rec) is None
    assert template.exists() and "warm_fallback_ms" not in (store.get_box(rec.id) or rec).timings


def test_two_creates_of_one_machine_at_once_keep_one_template(
    home: Home, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second ``adopt`` finds the first's template published between its removal of the
    old one and its own rename (the interleaving forced here): it keeps that one."""
    rec, box_dir = fresh_box(home, store)
    (box_dir / TOP).unlink()
    qcow2.write_overlay(home.root / "base.qcow2", SIZE, None)
    qcow2.write_overlay(box_dir / TOP, SIZE, "../../base.qcow2")  # one delta over the image, as a template's
    memory.blank_ram(box_dir, 128)
    (box_dir / f"{memory.STATE}.tmp").write_bytes(os.urandom(1000))
    memory.seal(box_dir, {"memory_mib": 128, "cpus": 1, "guest_bundle": "bundle"})
    first = make_template(home, rec)
    monkeypatch.setattr(templates, "_discard", lambda home, path: None)  # the other create published after it
    kept = templates.adopt(home, box_dir, rec)
    assert kept.id == first.name and kept.created_at == 1.0 and [t.id for t in templates.list_all(home)] == [kept.id]
    assert not [p for p in home.tmp.iterdir() if p.name.startswith("template-")], "the loser's files were left"


def test_the_cli_lists_and_removes_templates_on_a_server(home: Home, store: Store) -> None:
    """``boxvm --remote URL template ls|rm|create`` against a real ``boxvm serve`` over this home."""
    rec, _ = fresh_box(home, store)
    template = make_template(home, rec)
    token = secrets.token_hex(8)

    def cli(url: str, *args: str) -> Result:
        return CliRunner().invoke(main.cli, ["--remote", url, "--token", token, "template", *args])

    with serving(home, token) as (url, _pid):
        listed = cli(url, "ls", "--json")
        assert listed.exit_code == 0, listed.output
        assert [t["id"] for t in json.loads(listed.stdout)] == [template.name]
        bad = cli(url, "rm", "../../boxes")
        assert bad.exit_code == 1 and "16 hex digits" in bad.stderr and str(home.root) not in bad.stderr
        assert cli(url, "rm", template.name).exit_code == 0 and not template.exists()
        gone = cli(url, "rm", template.name)
        assert gone.exit_code == 1 and "NotFound" in gone.stderr
        refused = cli(url, "create", "--memory", "1")  # validated before anything boots
        assert refused.exit_code == 1 and "memory_mib" in refused.stderr
