"""``boxvm doctor --repair`` against a capture in flight: a capture publishes its layer file
before its row, so a scan whose walk passed the box just before took the new layer for an
orphan and deleted it, and the box lost what it wrote since its previous layer."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from boxvm.disks import qcow2
from boxvm.disks.layers import PENDING, TOP, LayerStore
from boxvm.errors import StorageError
from boxvm.paths import Home
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store


def _home(tmp_path: Path) -> tuple[Home, Store, LayerStore, Path]:
    home = Home(tmp_path / "home")
    home.ensure()
    store, layers = Store(home.db), LayerStore(home)
    base = home.images / "ab" / "base-1g.qcow2"
    base.parent.mkdir(parents=True)
    qcow2.write_overlay(base, 1 << 30, None)
    box = home.box_dir("b1")
    box.mkdir()
    qcow2.write_overlay(box / TOP, 1 << 30, os.path.relpath(base, box))
    store.insert_box(BoxRecord(id="b1", name="b1", status=BoxStatus.STOPPED, image="x", options={}, mac="m"))
    return home, store, layers, box


def test_repair_leaves_a_capture_published_during_its_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, store, layers, box = _home(tmp_path)
    walk, captured = layers._roots, []

    def roots(snapshot_layers: Iterable[str]) -> Iterator[Path]:
        yield from walk(snapshot_layers)
        if not captured:  # another process captures the box once the first walk has passed it
            layer, _parent = layers.prepare_capture(box)
            layers.commit(box)
            captured.append(layer)

    monkeypatch.setattr(layers, "_roots", roots)
    scan = layers.scan(store, repair=True)
    store.record_capture("b1", captured[0], None)  # the capture's own row, a moment later
    assert scan.deleted == [] and scan.adopted == []
    assert layers.layer_path(captured[0]).exists() and qcow2.chain(box / TOP)[1] == layers.layer_path(captured[0])
    monkeypatch.setattr(layers, "_roots", walk)
    assert layers.scan(store).clean
    orphan = home.root / "layers" / "all" / ("f" * 16 + ".qcow2")  # a crash's leftover is still collected
    qcow2.write_overlay(orphan, 1 << 20, None)
    assert layers.scan(store, repair=True).deleted == ["f" * 16] and not orphan.exists()


def test_a_pending_top_renamed_between_listing_and_reading_is_read_as_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit between its two renames when the first pass lists the layers, and its second
    rename (pending top to top) between the second pass's listing of the box and its read:
    both passes missed the layer, and the repair deleted it under the box."""
    _, store, layers, box = _home(tmp_path)
    walk, passes, captured = layers._roots, [], []

    def roots(snapshot_layers: Iterable[str]) -> Iterator[Path]:
        passes.append(1)
        for root in walk(snapshot_layers):
            if len(passes) == 2 and root.name == PENDING and (box / PENDING).exists():
                os.rename(box / PENDING, box / TOP)  # the commit's second rename, after the listing
            yield root
        if len(passes) == 1:  # the commit's first rename: the old top becomes the layer
            layer, _parent = layers.prepare_capture(box)
            os.rename(box / TOP, layers.layer_path(layer))
            captured.append(layer)

    monkeypatch.setattr(layers, "_roots", roots)
    scan = layers.scan(store, repair=True)
    store.record_capture("b1", captured[0], None)
    assert captured[0] not in scan.deleted and qcow2.chain(box / TOP)[1] == layers.layer_path(captured[0])


def test_a_capture_recorded_after_the_repair_adopted_it_is_not_pinned_twice(tmp_path: Path) -> None:
    """A capture whose row comes later than both passes is adopted; one whose row comes
    between the second pass and the repair's transaction is left to the capture (before, it
    got a permanent pin anyway, and it and its chain were kept for good)."""
    _, store, layers, box = _home(tmp_path)
    layer, parent = layers.prepare_capture(box)
    layers.commit(box)
    store.record_capture("b1", layer, parent)
    store.repair_layers({layer: parent}, {layer}, True)  # the adoption a scan decided before the row came
    assert store.layer_rows()[layer] == (parent, 1)


def test_a_capture_recorded_after_repair_adopted_its_layer_takes_it_over(tmp_path: Path) -> None:
    """A capture whose row comes later than both of repair's passes (its transaction behind
    another writer): repair adopts its layer under a permanent pin, and the capture's own
    record then takes the layer over (before, its insert failed, and every retry of it)."""
    _, store, layers, box = _home(tmp_path)
    first, _ = layers.prepare_capture(box)
    layers.commit(box)
    store.record_capture("b1", first, None)
    second, parent = layers.prepare_capture(box)  # over the first: a parent to hand over
    layers.commit(box)
    assert parent == first
    assert layers.scan(store, repair=True).adopted == [second]
    store.record_capture("b1", second, first)
    assert store.get_box("b1").layer == second
    assert store._db.execute("SELECT count(*) FROM layer_pins").fetchone()[0] == 0
    assert layers.scan(store).clean  # every count what its holders make it
    refs = dict(store._db.execute("SELECT id, refs FROM layers").fetchall())
    assert refs == {first: 1, second: 1} == {k: v for k, v in store.expected_refs().items() if k in refs}


def test_a_pending_top_that_names_a_path_of_its_choice_is_not_followed(tmp_path: Path) -> None:
    """A running box's QEMU can write its pending top's header: the commit that renames the
    old top to the layer the header names would have moved it to any path QEMU chose (a
    file of the user's, which QEMU could then write through the descriptor it holds)."""
    _, _store, layers, box = _home(tmp_path)
    victim = tmp_path / "victim" / ".ssh" / "authorized_keys"
    qcow2.write_overlay(box / PENDING, 1 << 30, str(victim))
    with pytest.raises(StorageError, match="backs onto no layer"):
        layers.commit(box)
    assert not victim.parent.exists() and (box / TOP).exists() and (box / PENDING).exists()


def test_a_chain_is_copied_only_as_the_store_records_it(tmp_path: Path) -> None:
    """An export or a full clone copies the bytes of the files a top's header chain names: a
    name a running box's QEMU wrote (into its top, or a top that became a layer) would have
    copied any file of the user's into the archive or the clone's disk."""
    _, _store, layers, box = _home(tmp_path)
    layers.verify_chain(box / TOP, [])  # over the image's base disk, as recorded
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = x\n")
    (box / TOP).unlink()
    qcow2.write_overlay(box / TOP, 1 << 30, str(secret), "raw")
    with pytest.raises(StorageError, match="chain"):
        layers.verify_chain(box / TOP, [])
    (box / TOP).unlink()
    qcow2.write_overlay(box / TOP, 1 << 30, "../../layers/all/0123456789abcdef.qcow2")  # a layer not in its chain
    with pytest.raises(StorageError):
        layers.verify_chain(box / TOP, [])
