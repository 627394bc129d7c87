"""Layer references in the store against the files: after every operation a hypothesis
state machine generates (create, snapshot, clone, clone from a snapshot, restore, remove,
import), the layers on disk are exactly those a from-scratch walk of every box's and
snapshot's chain reaches, and each row's count is what the rows holding it say. No VM is
booted: every operation works on boxes that never started.

Also: the consistency scan never deletes while a chain is unreadable, a home made before
layer rows gets them built once, and 4 processes removing and cloning the same boxes at
once leave the home consistent."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import shutil
import sqlite3
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule, run_state_machine_as_test

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.disks import qcow2
from boxvm.disks.layers import LAYER_FILE, TOP
from boxvm.errors import BoxvmError
from boxvm.options import BoxOptions, CloneOptions, ExportOptions, SnapshotOptions
from boxvm.paths import Home
from boxvm.store import SCHEMA_VERSION, Store


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A home of this module's own: its checks compare every layer of the home with the
    chains, and repair, which other workers' operations in the shared home would upset.
    The guest bundle, images and base disks are hard-linked from the test home."""
    shared = Path(os.environ["BOXVM_HOME"])
    private = Home.default(tmp_path_factory.mktemp("layer-refs") / "home")
    for part in ("guest", "images"):
        shutil.rmtree(private.root / part, ignore_errors=True)
        shutil.copytree(shared / part, private.root / part, copy_function=os.link, ignore=_in_progress)
    return private


def _in_progress(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith((".", "tmp"))]


def chain_walk(backend: LocalBackend) -> set[str]:
    """Every layer a box's top or a snapshot reaches, read from the files alone."""
    roots = [backend.home.box_dir(r.id) / TOP for r in backend.store.list_boxes()]
    roots += [backend.layers.layer_path(s.layer) for s in backend.store.list_snapshots()]
    return {p.name.removesuffix(".qcow2") for root in roots for p in qcow2.chain(root) if p.parent.name == "all"}


def assert_consistent(backend: LocalBackend) -> None:
    backend.layers.trash.flush()  # deletions finish in the background, after the call returned
    reached = chain_walk(backend)
    on_disk = backend.layers.layer_ids()
    assert on_disk == reached, f"kept unreferenced: {on_disk - reached}; deleted in use: {reached - on_disk}"
    rows = backend.store.layer_rows()
    assert set(rows) == reached
    expected = backend.store.expected_refs()
    assert {k: refs for k, (_p, refs) in rows.items()} == {k: expected.get(k, 0) for k in rows}
    assert backend.store.tombstones() == []
    scan = backend.check_layers()
    assert scan.clean, scan


class LayerMachine(RuleBasedStateMachine):
    boxes = Bundle("boxes")
    snaps = Bundle("snaps")

    def __init__(self) -> None:
        super().__init__()
        self.backend = LocalBackend(Home(HOME[0]))
        self.loop = asyncio.new_event_loop()
        self.n = 0

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def name(self) -> str:
        self.n += 1
        return f"lr-{os.getpid()}-{self.n}-{os.urandom(2).hex()}"

    def teardown(self) -> None:
        for rec in self.backend.store.list_boxes():
            if rec.name.startswith("lr-"):
                self.run(self.backend.remove(rec.id, True))
        assert_consistent(self.backend)
        self.run(self.backend.close())
        self.loop.close()

    @rule(target=boxes)
    def create(self) -> str:
        return self.run(self.backend.create(BoxOptions(disk_size_gb=1), self.name())).id

    @rule(target=boxes)
    def import_(self) -> str:
        return self.run(self.backend.import_box(ARCHIVE[0], self.name(), False)).id

    @rule(target=snaps, box=boxes, tag=st.integers(0, 2))
    def snapshot(self, box: str, tag: int) -> tuple[str, str]:
        with contextlib.suppress(BoxvmError):  # removed, or the name is taken: both refusals leave nothing
            self.run(self.backend.snapshot_create(box, f"s{tag}", SnapshotOptions()))
        return box, f"s{tag}"

    @rule(target=boxes, box=boxes, n=st.integers(1, 2))
    def clone(self, box: str, n: int) -> str:
        try:
            return self.run(self.backend.clone(box, [self.name() for _ in range(n)], CloneOptions()))[0].id
        except BoxvmError:
            return box

    @rule(target=boxes, snap=snaps)
    def clone_from_snapshot(self, snap: tuple[str, str]) -> str:
        try:
            opts = CloneOptions(from_snapshot=snap[1])
            return self.run(self.backend.clone(snap[0], [self.name()], opts))[0].id
        except BoxvmError:
            return snap[0]

    @rule(snap=snaps)
    def restore(self, snap: tuple[str, str]) -> None:
        with contextlib.suppress(BoxvmError):
            self.run(self.backend.snapshot_restore(*snap))

    @rule(snap=consumes(snaps))
    def remove_snapshot(self, snap: tuple[str, str]) -> None:
        with contextlib.suppress(BoxvmError):
            self.run(self.backend.snapshot_remove(*snap))

    @rule(box=consumes(boxes))
    def remove(self, box: str) -> None:
        with contextlib.suppress(BoxvmError):
            self.run(self.backend.remove(box, False))

    @invariant()
    def layers_match_the_chains(self) -> None:
        assert_consistent(self.backend)


HOME: list[Path] = []
ARCHIVE: list[Path] = []


def test_references_match_a_chain_walk(home: Home, tmp_path: Path) -> None:
    HOME[:] = [home.root]
    backend = LocalBackend(home)
    loop = asyncio.new_event_loop()
    try:
        src = loop.run_until_complete(backend.create(BoxOptions(disk_size_gb=1), "lr-export-src"))
        ARCHIVE[:] = [loop.run_until_complete(backend.export(src.id, tmp_path / "a.boxsnap", ExportOptions()))]
        loop.run_until_complete(backend.remove(src.id, False))
    finally:
        loop.run_until_complete(backend.close())
        loop.close()
    run_state_machine_as_test(
        LayerMachine,
        settings=settings(
            max_examples=8, stateful_step_count=12, derandomize=True, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )  # fmt: skip


@pytest.mark.asyncio
async def test_an_unreadable_chain_never_causes_a_deletion(home: Home) -> None:
    backend = LocalBackend(home)
    try:
        victim = await backend.create(BoxOptions(disk_size_gb=1), "lr-unreadable")
        await backend.snapshot_create(victim.id, "s", SnapshotOptions())
        await backend.snapshot_create(victim.id, "t", SnapshotOptions())
        held = chain_walk(backend)
        other = await backend.create(BoxOptions(disk_size_gb=1), "lr-other")
        await backend.snapshot_create(other.id, "s", SnapshotOptions())
        top = home.box_dir(victim.id) / TOP
        backend.store.settle_fresh(victim.id)  # as a start does: a top a guest writes into, never re-created
        good = top.read_bytes()
        orphan = backend.layers.root / ("f" * 16)
        orphan.mkdir()
        shutil.copy(backend.layers.layer_path(next(iter(held))), orphan / LAYER_FILE)
        top.write_bytes(b"not a qcow2 image" + good[17:])  # the victim's chain cannot be read
        await backend.snapshot_remove(victim.id, "s")  # the hot path needs no chain: the layers stay held
        await backend.remove(other.id, False)
        scan = backend.check_layers(repair=True)
        assert scan.unreadable and scan.orphans == ["f" * 16] and scan.deleted == []
        assert orphan.exists() and all(backend.layers.layer_path(x).exists() for x in held)
        top.write_bytes(good)
        scan = backend.check_layers(repair=True)
        assert scan.deleted == ["f" * 16] and not orphan.exists()
        assert backend.check_layers().clean
        await backend.remove(victim.id, False)
        assert_consistent(backend)
    finally:
        shutil.rmtree(backend.layers.root / ("f" * 16), ignore_errors=True)
        for rec in backend.store.list_boxes():
            if rec.name in ("lr-unreadable", "lr-other"):
                await backend.remove(rec.id, True)
        await backend.close()


@pytest.mark.asyncio
async def test_a_home_made_before_layer_rows_gets_them(home: Home, tmp_path: Path) -> None:
    """A copy of the home's layers, tops and database, taken back to schema v5: the
    migration builds the same rows from the files and tombstones a layer nothing holds."""
    backend = LocalBackend(home)
    names = []
    try:
        a = await backend.create(BoxOptions(disk_size_gb=1), "lr-mig-a")
        names.append(a.name)
        await backend.snapshot_create(a.id, "s", SnapshotOptions())
        names += [b.name for b in await backend.clone(a.id, ["lr-mig-b"], CloneOptions(from_snapshot="s"))]
        await backend.snapshot_create(a.id, "t", SnapshotOptions())
        await backend.snapshot_restore(a.id, "s")
        rows = backend.store.layer_rows()
        copy = Home(tmp_path / "home")
        (copy.root / "db").mkdir(parents=True)
        with sqlite3.connect(home.db) as src, sqlite3.connect(copy.db) as dst:
            src.backup(dst)
        shutil.copytree(backend.layers.root, copy.root / "layers")
        for rec in backend.store.list_boxes():
            (copy.boxes / rec.id).mkdir(parents=True)
            shutil.copy(home.box_dir(rec.id) / TOP, copy.boxes / rec.id / TOP)
        orphan = copy.root / "layers" / ("e" * 16)
        orphan.mkdir()
        shutil.copy(copy.root / "layers" / "all" / f"{next(iter(rows))}.qcow2", orphan / LAYER_FILE)
        with sqlite3.connect(copy.db) as db:
            db.executescript(
                "DROP TABLE layers; DROP TABLE layer_pins; DROP TABLE layer_tombstones; DROP INDEX snapshots_layer;"
                "ALTER TABLE boxes DROP COLUMN layer; ALTER TABLE boxes DROP COLUMN fresh;"
                "UPDATE meta SET value = '5' WHERE key = 'schema_version';"
            )
        store = Store(copy.db)
        assert store.schema_version == SCHEMA_VERSION
        assert store.layer_rows() == rows
        assert store.tombstones() == ["e" * 16]
        assert {r.id: r.layer for r in store.list_boxes()} == {r.id: r.layer for r in backend.store.list_boxes()}
        store.close()
    finally:
        for name in names:
            await backend.remove(name, True)
        await backend.close()


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "db" / "boxvm.db").close()
    with sqlite3.connect(tmp_path / "db" / "boxvm.db") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(BoxvmError, match="upgrade boxvm"):
        Store(tmp_path / "db" / "boxvm.db")


PROCESSES = 4


def _storm(root: str, names: list[str], seed: int) -> list[str]:
    """Remove, clone (from a snapshot and of the current state), snapshot and restore the
    shared boxes at random; returns unexpected errors."""

    async def run() -> list[str]:
        rng = random.Random(seed)
        backend = LocalBackend(Home(Path(root)))
        bad = []
        try:
            for k in range(25):
                op = rng.choice(["remove", "clone-snap", "clone-snap", "clone", "snapshot", "restore", "snap-rm"])
                name = rng.choice(names)
                try:
                    if op == "remove":
                        await backend.remove(name, False)
                    elif op == "clone-snap":
                        await backend.clone(name, [f"{name}-p{seed}-{k}"], CloneOptions(from_snapshot="gold"))
                    elif op == "clone":
                        await backend.clone(name, [f"{name}-q{seed}-{k}"], CloneOptions())
                    elif op == "snapshot":
                        await backend.snapshot_create(name, f"x{rng.randrange(2)}", SnapshotOptions())
                    elif op == "restore":
                        await backend.snapshot_restore(name, "gold")
                    else:
                        await backend.snapshot_remove(name, f"x{rng.randrange(2)}")
                except (boxvm.InvalidState, boxvm.NotFound, boxvm.AlreadyExists):
                    pass
                except Exception:
                    bad.append(f"{op} {name}: {traceback.format_exc()}")
        finally:
            await backend.close()
        return bad

    return asyncio.run(run())


@pytest.mark.asyncio
async def test_four_processes_removing_and_cloning(home: Home) -> None:
    backend = LocalBackend(home)
    src = await backend.create(BoxOptions(disk_size_gb=1), "lr-storm")
    await backend.snapshot_create(src.id, "gold", SnapshotOptions())
    boxes = await backend.clone(src.id, [f"lr-storm-{i}" for i in range(8)], CloneOptions(from_snapshot="gold"))
    names = [b.name for b in boxes]
    for name in names:
        await backend.snapshot_create(name, "gold", SnapshotOptions())
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(PROCESSES) as pool:
            bad = await asyncio.to_thread(pool.starmap, _storm, [(str(home.root), names, i) for i in range(PROCESSES)])
        assert [b for b in bad if b] == []
        assert_consistent(backend)
    finally:
        for rec in backend.store.list_boxes():
            if rec.name.startswith("lr-storm"):
                await backend.remove(rec.id, True)
        assert_consistent(backend)
        await backend.close()
