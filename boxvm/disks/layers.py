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
collection deletes the rest, under the same lock the renames take. It fails closed: a
root that vanished (a box being removed) is no user, but one whose chain cannot be read
(a top being written, a broken chain) makes it delete nothing. A staged box is renamed
into ``boxes/`` under the lock only once its whole chain exists, so a layer collected
while it was being staged fails that box's creation instead of leaving it dangling.

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
import logging
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

log = logging.getLogger("boxvm")

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
        with self.lock():
            self._commit_locked(box_dir)

    def _commit_locked(self, box_dir: Path) -> None:
        pending = box_dir / PENDING
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
                fsync_dir(self.root)  # the new layer directory's entry
                top.chmod(0o400)  # immutable from now on
                os.rename(top, target)
                fsync_dir(target.parent)
                faults.point("commit:top-moved")
        os.rename(pending, top)
        fsync_dir(box_dir)

    def capture(self, box_dir: Path) -> str:
        """Capture a box at rest: its top becomes an immutable layer, O(1) in disk size."""
        layer_id = self.prepare_capture(box_dir)
        self.commit(box_dir)
        return layer_id

    def restore(self, box_dir: Path, layer_id: str) -> None:
        """Give the box a fresh empty top over ``layer_id``; its later changes are dropped.

        Under the lock: were the layer collected between writing the pending top and
        committing it, the commit would take the pending top for a capture's and make the
        current top that layer. Raises FileNotFoundError if the layer is gone."""
        with self.lock():
            size = qcow2.read_header(self.layer_path(layer_id)).size
            qcow2.write_overlay(box_dir / PENDING, size, self.reference(layer_id))  # fails if one is pending
            faults.point("restore:pending-written")
            self._commit_locked(box_dir)

    def new_top(self, box_dir: Path, layer_id: str) -> None:
        """A new box's (clone's) own top over a layer."""
        size = qcow2.read_header(self.layer_path(layer_id)).size
        qcow2.write_overlay(box_dir / TOP, size, self.reference(layer_id))

    def publish(self, staged: Path, final: Path) -> None:
        """Rename a staged box directory into ``boxes/``, durably, if its top's whole chain
        still exists (FileNotFoundError otherwise: a layer was collected meanwhile)."""
        with self.lock():
            qcow2.chain(staged / TOP)  # raises if a file on it is missing
            staged.rename(final)
            fsync_dir(final.parent)

    # -- liveness ---------------------------------------------------------------------
    def _roots(self, snapshot_layers: Iterable[str]) -> Iterator[Path]:
        """Snapshot layers, then the tops of staged boxes, then of boxes: staged boxes only
        ever move from ``tmp/`` to ``boxes/``, so one moved while being read is met again
        in ``boxes/``, which is listed after ``tmp/`` has been read."""
        yield from (self.layer_path(layer) for layer in snapshot_layers)
        for parent in (self.home.tmp, self.home.boxes):
            for entry in _listdir(parent):
                for name in _listdir(parent / entry):
                    if name in (TOP, PENDING):  # (a guest top only ever backs onto a bundle)
                        yield parent / entry / name

    def chains(self, snapshot_layers: Iterable[str]) -> dict[Path, list[Path]]:
        """Best effort, for reports: roots that cannot be read are left out."""
        out = {}
        for root in self._roots(snapshot_layers):
            with contextlib.suppress(OSError, ValueError, StorageError):
                out[root] = qcow2.chain(root)
        return out

    def gc(self, snapshot_layers: Iterable[str]) -> list[str]:
        """Delete layers no box, staged box or snapshot reaches. Returns their ids; none
        if any root's chain cannot be read (fail closed)."""
        removed = []
        with self.lock():
            alive: set[Path] = set()
            for root in self._roots(snapshot_layers):
                try:
                    alive.update(_reach(root))
                except (OSError, ValueError, StorageError) as exc:
                    log.warning("layer garbage collection skipped: cannot read the chain of %s: %s", root, exc)
                    return []
            for entry in _listdir(self.root):
                if entry.startswith(".") or Path(os.path.normpath(self.root / entry / LAYER_FILE)) in alive:
                    continue
                shutil.rmtree(self.root / entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def layer_files(self) -> list[Path]:
        """Every layer file now (layers removed meanwhile are left out)."""
        files = (self.root / entry / LAYER_FILE for entry in _listdir(self.root) if not entry.startswith("."))
        return [p for p in files if p.exists()]

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


def _listdir(path: Path) -> list[str]:
    """Entries of a directory that may be removed meanwhile (then: none)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _reach(root: Path) -> list[Path]:
    """The files ``root`` keeps alive: none if it vanished. Raises if its chain cannot be
    read (a root still being written, a missing backing file) rather than guess."""
    try:
        qcow2.read_header(root)  # unlike chain(), a root that is not (yet) a qcow2 is an error
        return qcow2.chain(root)
    except FileNotFoundError:
        if not root.exists():
            return []  # removed meanwhile: no longer a user
        if root.name == PENDING:  # a capture's pending top names the layer its top will become
            header = qcow2.read_header(root)
            if header.backing_file and not qcow2.resolve_backing(root, header.backing_file).exists():
                return [root]
        raise


def _layer_files(chain: list[Path]) -> list[Path]:
    return [p for p in chain if p.name in (TOP, PENDING, LAYER_FILE)]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file or directory created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
