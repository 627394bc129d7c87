"""The layer store: immutable qcow2 layers shared by boxes, clones and snapshots.

Layout (all under the runtime home, one filesystem, renames atomic):

    boxes/<box>/disk.qcow2       the box's writable top
    boxes/<box>/disk.new.qcow2   a pending top (exists only during an operation)
    layers/<layer>/layer.qcow2   an immutable layer: a former top
    images/<digest>/base-*.qcow2 image base disks (the bottom of every chain)

Boxes and layers sit at the same depth, so every backing reference is relative
(``../../layers/<id>/layer.qcow2``) and stays valid when a top is renamed into
``layers/`` and when the whole home is moved.

Every change is "write the pending top, then rename": capturing moves the current top
into ``layers/`` and renames the pending top (whose backing is that layer) into place;
restoring renames a pending top over a snapshot's layer over the current one. Recovery
only ever rolls forward, which is always safe: a pending top is either still empty or
holds writes made after the capture.

Which layers are alive is read from the files themselves: everything on the backing
chain of a box's top (or pending top), of a staged box, or of a snapshot. Garbage
collection deletes the rest, under the same lock the renames take.

A running QEMU never sees those names. It opens every top through a hard link of its
own (``boxes/<box>/.live-<n>.qcow2``) that is never renamed or reused while it runs,
because QEMU remembers a node by the name it opened and reopens by that name (block
jobs do): after our renames, ``disk.qcow2`` would name a different file than the node
QEMU opened under it. The links sit at the same depth as the tops, so relative backing
references resolve the same through them; they are not roots for liveness or usage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boxvm import faults
from boxvm.disks import qcow2
from boxvm.errors import StorageError
from boxvm.paths import Home

TOP = "disk.qcow2"
PENDING = "disk.new.qcow2"
GUEST_TOP = "guest-rootfs.qcow2"
LAYER_FILE = "layer.qcow2"
LIVE_PREFIX = ".live-"


@dataclass(frozen=True)
class Usage:
    owned_bytes: int  # held only by this box or snapshot
    shared_bytes: int  # held by it and at least one other
    chain_depth: int


class LayerStore:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.root = home.root / "layers"
        self.root.mkdir(parents=True, exist_ok=True)

    # -- naming -----------------------------------------------------------------------
    def layer_path(self, layer_id: str) -> Path:
        return self.root / layer_id / LAYER_FILE

    @staticmethod
    def reference(layer_id: str) -> str:
        """The backing reference to a layer from any box (or staged box) directory."""
        return f"../../layers/{layer_id}/{LAYER_FILE}"

    @staticmethod
    def live_link(box_dir: Path, serial: int) -> Path:
        """The name a running QEMU opens the ``serial``-th top of this run under."""
        return box_dir / f"{LIVE_PREFIX}{serial}.qcow2"

    @staticmethod
    def clear_live_links(box_dir: Path) -> None:
        for link in box_dir.glob(f"{LIVE_PREFIX}*.qcow2"):
            link.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialises renames against garbage collection (across processes)."""
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- operations -------------------------------------------------------------------
    def prepare_capture(self, box_dir: Path) -> str:
        """Step 1 of a capture: write the pending top over a layer id that does not exist
        yet (the current top will become it). Nothing the box uses changes."""
        layer_id = secrets.token_hex(8)
        size = qcow2.read_header(box_dir / TOP).size
        qcow2.write_overlay(box_dir / PENDING, size, self.reference(layer_id))  # fails if one is pending
        return layer_id

    def commit(self, box_dir: Path) -> None:
        """Roll a pending top forward into place (idempotent; used by every operation and
        by recovery). If the pending top's layer does not exist yet the current top
        becomes that layer (a capture); otherwise the current top is dropped (a restore)."""
        pending = box_dir / PENDING
        with self.lock():
            if not pending.exists():
                return
            header = qcow2.read_header(pending)
            if header.backing_file is None:
                raise StorageError(f"{pending} has no backing layer: remove it by hand")
            target = Path(os.path.normpath(qcow2.resolve_backing(pending, header.backing_file)))
            top = box_dir / TOP
            if top.exists():
                if target.exists():
                    top.unlink()
                else:
                    target.parent.mkdir(exist_ok=True)
                    top.chmod(0o400)  # immutable from now on
                    os.rename(top, target)
                    _fsync_dir(target.parent)
                    faults.point("commit:top-moved")
            os.rename(pending, top)
            _fsync_dir(box_dir)

    def capture(self, box_dir: Path) -> str:
        """Capture a box at rest: its top becomes an immutable layer, O(1) in disk size."""
        layer_id = self.prepare_capture(box_dir)
        self.commit(box_dir)
        return layer_id

    def restore(self, box_dir: Path, layer_id: str) -> None:
        """Give the box a fresh empty top over ``layer_id``; its later changes are dropped."""
        size = qcow2.read_header(self.layer_path(layer_id)).size
        qcow2.write_overlay(box_dir / PENDING, size, self.reference(layer_id))  # fails if one is pending
        faults.point("restore:pending-written")
        self.commit(box_dir)

    def new_top(self, box_dir: Path, layer_id: str) -> None:
        """A new box's (clone's) own top over a layer."""
        size = qcow2.read_header(self.layer_path(layer_id)).size
        qcow2.write_overlay(box_dir / TOP, size, self.reference(layer_id))

    # -- liveness ---------------------------------------------------------------------
    def _roots(self, snapshot_layers: Iterable[str]) -> list[Path]:
        roots = [self.layer_path(layer) for layer in snapshot_layers]
        for parent in (self.home.boxes, self.home.tmp):
            if parent.is_dir():
                roots += [p for p in parent.glob("*/*.qcow2") if not p.name.startswith(LIVE_PREFIX)]
        return roots

    def chains(self, snapshot_layers: Iterable[str]) -> dict[Path, list[Path]]:
        out = {}
        for root in self._roots(snapshot_layers):
            with contextlib.suppress(OSError, ValueError, StorageError):
                out[root] = qcow2.chain(root)
        return out

    def gc(self, snapshot_layers: Iterable[str]) -> list[str]:
        """Delete layers no box, staged box or snapshot reaches. Returns their ids."""
        removed = []
        with self.lock():
            alive = {p for chain in self.chains(snapshot_layers).values() for p in chain}
            for entry in self.root.iterdir():
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                if Path(os.path.normpath(entry / LAYER_FILE)) not in alive:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        return removed

    def usage(self, owners: dict[str, Path], snapshot_layers: Iterable[str]) -> dict[str, Usage]:
        """Bytes each owner (a name -> its top file) holds alone and shares with others.
        Image bases and the guest root are not counted: they belong to the image cache."""
        holders = Counter(p for chain in self.chains(snapshot_layers).values() for p in set(_layer_files(chain)))
        out = {}
        for name, top in owners.items():
            chain = self._chain_or_empty(top)
            files = set(_layer_files(chain))
            owned = sum(qcow2.allocated_bytes(p) for p in files if holders[p] <= 1)
            shared = sum(qcow2.allocated_bytes(p) for p in files if holders[p] > 1)
            out[name] = Usage(owned, shared, len(chain))
        return out

    @staticmethod
    def _chain_or_empty(top: Path) -> list[Path]:
        try:
            return qcow2.chain(top)
        except (OSError, StorageError):
            return []


def _layer_files(chain: list[Path]) -> list[Path]:
    return [p for p in chain if p.name in (TOP, PENDING, LAYER_FILE)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
