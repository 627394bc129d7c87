"""The layer store: immutable qcow2 layers shared by boxes, clones and snapshots.

Layout (all under the runtime home, one filesystem, renames atomic):

    boxes/<box>/disk.qcow2       the box's writable top
    boxes/<box>/disk.new.qcow2   a pending top (exists only during an operation)
    layers/all/<layer>.qcow2     an immutable layer: a former top
    images/<digest>/base-*.qcow2 image base disks (the bottom of every chain)

Boxes and layers sit at the same depth, so every backing reference is relative
(``../../layers/all/<id>.qcow2``) and stays valid when a top is renamed into
``layers/all/`` and when the whole home is moved. One directory holds every layer: a
capture renames the top in and syncs that directory once (a directory per layer cost a
mkdir and a second directory sync). Homes made before keep their
``layers/<layer>/layer.qcow2`` files, which are read, referenced and deleted as before.

Every change is "write the pending top, then rename": capturing moves the current top
into ``layers/`` and renames the pending top (whose backing is that layer) into place;
restoring renames a pending top over a snapshot's layer over the current one. Recovery
only ever rolls forward, which is always safe: a pending top is either still empty or
holds writes made after the capture.

Which layers are alive is recorded in the store (``store/db.py``, "layers"): each layer
row has its parent and a count of the boxes, snapshots, child layers and pins holding
it, changed in the same transaction as the metadata that holds it. A layer whose count
reaches zero is tombstoned in that transaction; after the commit its directory is moved
into the process's trash (one rename) and deleted off the caller's path (:class:`Trash`),
or by recovery: no operation walks the home. A capture writes its files first and records the new layer after; recovery
records a capture its process died before recording (``adopt_capture``), so a layer
on disk without a row is never deleted by the hot path. :func:`scan` is the full
consistency check (``boxvm doctor``): it walks every chain from the files and refuses
to delete anything if one cannot be read (fail closed).

A running QEMU never sees those names. It opens every top through a hard link of its
own (``boxes/<box>/.live-<n>.qcow2``) that is never renamed or reused while it runs,
because QEMU remembers a node by the name it opened and reopens by that name (block
jobs do): after our renames, ``disk.qcow2`` would name a different file than the node
QEMU opened under it. The links sit at the same depth as the tops, so relative backing
references resolve the same through them; they are not roots for liveness or usage.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from boxvm import faults
from boxvm.disks import qcow2
from boxvm.errors import AlreadyExists, StorageError
from boxvm.paths import Home

log = logging.getLogger("boxvm")

TOP = "disk.qcow2"
PENDING = "disk.new.qcow2"
GUEST_TOP = "guest-rootfs.qcow2"
LAYER_DIR = "all"  # layers/all/<layer>.qcow2
LAYER_SUFFIX = ".qcow2"
LAYER_FILE = "layer.qcow2"  # layers/<layer>/layer.qcow2, in homes made before layers/all/
LIVE_PREFIX = ".live-"
LIVE_DIR = "live"  # a running QEMU's later tops and scratch files: all of the box it may write (engine/confine)
SETTLE_SECS = 0.02  # the trash worker's wait before it starts (see Trash._run)
TRASH_PREFIX = "trash-"  # tmp/trash-<pid>-*: what this process made unreachable, being deleted
_LAYER_ID = re.compile(r"[0-9a-f]{16}")
_REFERENCE = re.compile(r"^\.\./\.\./layers/(?:all/([0-9a-f]{16})\.qcow2|([0-9a-f]{16})/layer\.qcow2)$")


class Refs(Protocol):
    """What the layer files need of the layer references (``store.Store``): named here so
    that the store, whose migration reads layer headers, and the layers do not import
    each other."""

    def sync(self) -> None: ...
    def has_layer(self, layer: str) -> bool: ...
    def get_box(self, id_or_name: str) -> Any: ...
    def list_snapshots(self) -> Any: ...
    def tombstones(self) -> list[str]: ...
    def forget_tombstones(self, layers: list[str]) -> None: ...
    def layer_rows(self) -> dict[str, tuple[str | None, int]]: ...
    def expected_refs(self) -> dict[str, int]: ...
    def layer_counts(self) -> tuple[dict[str, tuple[str | None, int]], dict[str, int]]: ...
    def repair_layers(self, adopt: dict[str, str | None], reached: set[str], may_delete: bool) -> None: ...


@dataclass(frozen=True)
class Usage:
    owned_bytes: int  # held only by this box or snapshot
    shared_bytes: int  # held by it and at least one other
    chain_depth: int


class LayerStore:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.root = home.root / "layers"
        self.all = self.root / LAYER_DIR
        self.all.mkdir(parents=True, exist_ok=True)
        self.trash = Trash(home.tmp)
        self._bases: dict[str, Path | None] = {}  # layer -> the file it backs onto (see _base_of)
        self._current: set[str] = set()  # layers seen in layers/all/ (see _legacy)

    # -- naming -----------------------------------------------------------------------
    def layer_path(self, layer_id: str) -> Path:
        if self._legacy(layer_id):
            return self.root / layer_id / LAYER_FILE  # made before layers/all/
        return self.all / f"{layer_id}{LAYER_SUFFIX}"

    def reference(self, layer_id: str) -> str:
        """The backing reference to a layer from any box (or staged box) directory (as
        :meth:`layer_path` decides, in strings: on every restore and clone's path)."""
        if self._legacy(layer_id):
            return f"../../layers/{layer_id}/{LAYER_FILE}"
        return f"../../layers/{LAYER_DIR}/{layer_id}{LAYER_SUFFIX}"

    def _legacy(self, layer_id: str) -> bool:
        """The layer is laid out as before layers/all/ (its own directory). One seen in
        layers/all/ is remembered: it never moves and ids are never reused."""
        if layer_id in self._current:
            return False
        if os.path.exists(f"{self.all}/{layer_id}{LAYER_SUFFIX}"):
            if len(self._current) >= 4096:  # bounded, like _bases
                self._current.clear()
            self._current.add(layer_id)
            return False
        return os.path.isdir(f"{self.root}/{layer_id}")

    def chain_of(self, top: Path | None, layers: list[str]) -> list[Path]:
        """A chain as the store knows it (``layers``: top first, from ``Store.layer_chain``):
        ``top``, the layers' files and the image base the bottom one backs onto -- one
        header read, where reading the chain from the files costs one per layer."""
        files = ([top] if top is not None else []) + [self.layer_path(layer) for layer in layers]
        base = self._base_of(layers[-1]) if layers else backing_of(top) if top is not None else None
        return files if base is None else [*files, base]

    def verify_chain(self, top: Path, below: list[str]) -> None:
        """Before a chain's bytes are copied (an export, a full clone) by reading its headers:
        the files they name are the ones the store records under ``top`` (``below``), over an
        image's base disk, with no external data file. A running box's QEMU writes its top's
        header, and every layer was a top once: a name it wrote would copy any file of the
        user's into an archive or a clone's disk."""
        expected = [Path(os.path.normpath(p)) for p in self.chain_of(top, below)]
        try:
            actual = qcow2.chain(top)
            headers = [qcow2.read_header(p) for p in actual]
        except (OSError, ValueError, StorageError) as exc:
            raise StorageError(f"a disk chain of this home cannot be read ({exc.__class__.__name__})") from None
        base = expected[-1] if len(expected) > 1 + len(below) else None
        if (
            actual != expected
            or any(h.data_file is not None for h in headers)
            or (base is not None and not beneath(base, self.home.images))
        ):
            raise StorageError("a disk's backing chain is not the one this home records: run `boxvm doctor`")

    def chain_depth(self, top: Path, layers: list[str]) -> int:
        """``len(chain_of(top, layers))`` with no file read once the bottom layer is known."""
        base = self._base_of(layers[-1]) if layers else backing_of(top)
        return 1 + len(layers) + (base is not None)

    def _base_of(self, layer: str) -> Path | None:
        """The file a layer backs onto (its image base), remembered: a layer never changes
        once it has its name (ids are random and never reused), so one header read serves
        the process. One that cannot be read is not remembered."""
        if layer not in self._bases:
            try:
                base = _backing_path(self.layer_path(layer))
            except (OSError, ValueError, StorageError):
                return None
            if len(self._bases) >= 4096:  # bounded: a long-lived process meets many layers
                self._bases.clear()
            self._bases[layer] = base
        return self._bases[layer]

    @staticmethod
    def live_link(box_dir: Path, serial: int) -> Path:
        """The name a running QEMU opens the ``serial``-th top of this run under. The first,
        opened at start with its backing chain, sits beside the top (its header's backing
        name is relative to it); later ones, opened without their backing, in ``live/``: the
        one directory of the box QEMU may write in (``engine/confine``)."""
        return box_dir / f"{LIVE_PREFIX}0.qcow2" if serial == 0 else box_dir / LIVE_DIR / f"{LIVE_PREFIX}{serial}.qcow2"

    @staticmethod
    def clear_live_links(box_dir: Path) -> None:
        for link in (*box_dir.glob(f"{LIVE_PREFIX}*.qcow2"), *(box_dir / LIVE_DIR).glob(f"{LIVE_PREFIX}*.qcow2")):
            link.unlink(missing_ok=True)

    # -- operations -------------------------------------------------------------------
    def prepare_capture(self, box_dir: Path) -> tuple[str, str | None]:
        """Step 1 of a capture: write the pending top over a layer id that does not exist
        yet (the current top will become it). Nothing the box uses changes. Returns the
        new layer's id and the layer the current top backs onto (its parent-to-be)."""
        layer_id = secrets.token_hex(8)
        header = qcow2.read_header(box_dir / TOP)
        qcow2.write_overlay(box_dir / PENDING, header.size, self.reference(layer_id))  # fails if one is pending
        return layer_id, _layer_of_reference(header.backing_file)

    def commit(self, box_dir: Path, sync: bool = True) -> None:
        """Roll a pending top forward into place (idempotent; used by every operation and
        by recovery). If the pending top's layer does not exist yet the current top
        becomes that layer (a capture); otherwise the current top is dropped (a restore).
        Only the operation holding the box's claim (or recovery, which takes it over)
        calls this, so no lock: collection deletes only tombstoned layers. ``sync=False``
        (a capture at rest) leaves the last rename to the next commit after a power loss:
        the pending top is still there to roll forward, and nothing is deleted on its word."""
        pending = box_dir / PENDING
        if not pending.exists():
            return
        try:
            header = qcow2.read_header(pending)
        except ValueError:  # a fresh top written without a sync, cut by a crash: no data in it
            log.warning("%s: dropping an unreadable pending top (a crash cut its writes)", box_dir.name)
            pending.unlink()
            return
        # The name is the pending top's header, which a running box's QEMU can write: only
        # a layer's own name is followed, never a path it chose (the top would go there).
        match = _REFERENCE.fullmatch(header.backing_file or "")
        if match is None:
            raise StorageError(f"the pending top of box {box_dir.name} backs onto no layer: remove it by hand")
        target = self.all / f"{match[1]}.qcow2" if match[1] else self.root / match[2] / LAYER_FILE
        top = box_dir / TOP
        if top.exists():
            if target.exists():
                self.trash.discard([(top, f"T-{secrets.token_hex(8)}")])  # a restore's dropped top
            else:
                if target.parent != self.all:  # a capture begun before layers/all/
                    target.parent.mkdir(exist_ok=True)
                    fsync_dir(self.root)
                top.chmod(0o400)  # immutable from now on
                os.rename(top, target)
                fsync_dir(target.parent)
                faults.point("commit:top-moved")
        os.rename(pending, top)
        if sync:
            fsync_dir(box_dir)

    @staticmethod
    def quiet_top(box_dir: Path) -> tuple[int, str | None] | None:
        """(virtual size, layer) of a box's top with no pending top beside it -- a box at
        rest whose files need no roll-forward -- else None. One header read."""
        if (box_dir / PENDING).exists():
            return None
        try:
            header = qcow2.read_header(box_dir / TOP)
        except (OSError, ValueError, StorageError):
            return None
        return header.size, _layer_of_reference(header.backing_file)

    def restore(self, box_dir: Path, layer_id: str, size: int) -> None:
        """Give the box a fresh empty top over ``layer_id`` (which the box's record holds
        already, marked fresh); its later changes are dropped. ``size``: the disk's virtual
        size. Nothing is synced here: the top is regenerable from the record (:meth:`renew`),
        and the layers this releases are deleted only after the box directory is synced
        (``collect(..., synced=[box_dir])``)."""
        qcow2.write_overlay(box_dir / PENDING, size, self.reference(layer_id), sync=False)  # fails if one is pending
        faults.point("restore:pending-written")
        self.commit(box_dir, sync=False)

    def repoint(self, box_dir: Path, old: str, layer_id: str) -> bool:
        """A restore's files in one write, if the box's top holds no data (an empty overlay
        over ``old``, as the last restore, capture or clone left it; a crash cutting the
        write leaves a fresh top that :meth:`renew` re-creates): the top is re-pointed at
        ``layer_id`` in place. False if it is not such a top, or a pending top lies beside it
        (a crash left files to roll forward: the caller takes the long way, which does)."""
        if os.path.lexists(box_dir / PENDING):
            return False
        over_old = lambda name: _layer_of_reference(name) == old  # noqa: E731
        done = qcow2.repoint_empty(box_dir / TOP, over_old, self.reference(layer_id))
        faults.point("restore:repointed")  # written, not committed (it runs inside the transaction)
        return done

    def renew(self, box_dir: Path, layer_id: str) -> bool:
        """A fresh top (an empty overlay over ``layer_id``, as the box's record says, never
        synced) that a crash lost or cut is written again; True if it was. Any other file
        in its place is a state the record's commit superseded (a restore's old top)."""
        top = box_dir / TOP
        reference = self.reference(layer_id)
        if qcow2.is_empty_overlay(top, reference):
            return False
        log.warning("%s: re-creating its fresh top over layer %s (a crash lost it)", box_dir.name, layer_id)
        size = qcow2.read_header(self.layer_path(layer_id)).size
        top.unlink(missing_ok=True)
        qcow2.write_overlay(top, size, reference)
        return True

    @staticmethod
    def new_guest_top(box_dir: Path, rootfs: Path, sync: bool = True) -> None:
        """A box's guest top: an empty overlay over the guest bundle's root filesystem (raw),
        referenced relative to ``box_dir`` (a staging directory under ``tmp/`` is at the depth
        of ``boxes/<id>``, so the reference holds after the rename)."""
        reference = guest_reference(box_dir, rootfs)
        qcow2.write_overlay(box_dir / GUEST_TOP, rootfs.stat().st_size, reference, "raw", sync=sync)

    def new_top(self, box_dir: Path, layer_id: str, size: int, sync: bool = True) -> None:
        """A new box's (clone's) own top over a layer (held by a pin while it is staged);
        ``sync=False``: the caller fsyncs it (:func:`fsync_files`) before publishing it."""
        qcow2.write_overlay(box_dir / TOP, size, self.reference(layer_id), sync=sync)

    @staticmethod
    def publish(moves: list[tuple[Path, Path]], renamed: list[Path], sync: bool = True) -> None:
        """Rename staged box directories into ``boxes/``, durably (one directory sync for
        all; ``sync=False``: regenerable from their records, see ``Staging.publish``). Their
        layer is held (a pin, then their records), so nothing they back onto can be
        collected meanwhile. Each final path is appended to ``renamed`` as it is made, so a
        failure part-way undoes exactly those: a final that already existed (another box's
        directory under the same id) is never ours to remove."""
        for staged, final in moves:
            try:
                staged.rename(final)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise AlreadyExists(f"box id {final.name} is taken: choose another id") from None
                raise
            renamed.append(final)
        for parent in {final.parent for _staged, final in moves} if sync else ():
            fsync_dir(parent)

    def _rmtree(self, layer: str) -> bool:
        if not _LAYER_ID.fullmatch(layer):
            log.warning("tombstone %r is not a layer id: ignored", layer)
            return False
        (self.all / f"{layer}{LAYER_SUFFIX}").unlink(missing_ok=True)
        shutil.rmtree(self.root / layer, ignore_errors=True)
        return not (self.root / layer).exists()

    def collect(self, store: Refs, layers: list[str], synced: Iterable[Path] = ()) -> list[str]:
        """Move the files of layers just tombstoned into the trash (idempotent: any process
        may do it, recovery repeats it); the trash deletes them, then their tombstones,
        once ``synced`` (directories whose renames stopped using them) and the store's
        commits are durable."""
        if not layers:
            return []
        faults.point("collect:tombstoned")  # committed, files not yet deleted: recovery deletes them
        gone = []
        for layer in layers:
            if _LAYER_ID.fullmatch(layer):
                gone.append(layer)
            else:
                log.warning("tombstone %r is not a layer id: ignored", layer)
        items = [(self.all / f"{layer}{LAYER_SUFFIX}", f"L-{layer}{LAYER_SUFFIX}") for layer in gone]
        items += [(self.root / layer, f"L-{layer}") for layer in gone if (self.root / layer).is_dir()]
        self.trash.discard(items, synced, store.sync, lambda: store.forget_tombstones(gone))
        return gone

    def recover_trash(self, store: Refs, alive: Callable[[int], bool]) -> None:
        """Start-up recovery of dead processes' trash: what the store still holds (its
        commit was lost to a power cut before the trash was synced) goes back; the rest
        is deleted."""
        for entry in _listdir(self.home.tmp):
            pid = entry.split("-")[1] if entry.startswith(TRASH_PREFIX) and entry.count("-") >= 2 else ""
            if not pid.isdigit() or alive(int(pid)):
                continue
            trash = self.home.tmp / entry
            for name in _listdir(trash):
                kind, _, ident = name.partition("-")
                layer = ident.removesuffix(LAYER_SUFFIX)
                home = {"L": self.all / ident if ident != layer else self.root / ident, "B": self.home.boxes / ident}
                held = (kind == "L" and store.has_layer(layer)) or (kind == "B" and store.get_box(ident) is not None)
                if kind in home and held and not home[kind].exists():
                    log.warning("putting %s back: the store still holds it", name)
                    os.rename(trash / name, home[kind])
            shutil.rmtree(trash, ignore_errors=True)

    # -- the full consistency scan -----------------------------------------------------
    def _roots(self, snapshot_layers: Iterable[str]) -> Iterator[Path]:
        """Snapshot layers, then the tops of staged boxes, then of boxes: staged boxes only
        ever move from ``tmp/`` to ``boxes/``, so one moved while being read is met again
        in ``boxes/``, which is listed after ``tmp/`` has been read."""
        yield from (self.layer_path(layer) for layer in snapshot_layers)
        for parent in (self.home.tmp, self.home.boxes):
            for entry in _listdir(parent):
                for directory in (parent / entry, parent / entry / "box"):  # an import stages one level down
                    names = _listdir(directory)
                    if PENDING in names:  # its top too, after it: a commit may rename the one to the other
                        yield directory / PENDING  # between the listing and the read (then read as gone)
                        yield directory / TOP
                    elif TOP in names:  # (a guest top only ever backs onto a bundle)
                        yield directory / TOP

    def chains(self, snapshot_layers: Iterable[str]) -> dict[Path, list[Path]]:
        """Best effort, for reports: roots that cannot be read are left out."""
        out = {}
        for root in self._roots(snapshot_layers):
            with contextlib.suppress(OSError, ValueError, StorageError):
                out[root] = qcow2.chain(root)
        return out

    def scan(self, store: Refs, repair: bool = False) -> Scan:
        """Compare the layer rows with a walk of every chain in the home (``boxvm doctor``).

        Finds counts that differ from the rows holding them, layer files no row knows
        (kept by a file: a row is added; reached by nothing: an orphan) and rows whose
        file is gone. With ``repair``, fixes the counts and rows and deletes orphans and
        tombstoned layers -- only if every chain could be read: a chain that cannot be
        read might reach any layer, so then nothing is deleted (fail closed)."""
        self.trash.flush()  # deletions this process queued settle first (they change the tombstones)
        result, reached, parents = self._pass(store)
        if repair:
            # A capture (or clone) publishes its layer file before its row, so a file whose
            # box the walk passed just before looks like an orphan, or, reached, like a
            # crash's leftover to adopt (the capture's own row would then collide). Only what
            # a second pass finds the same, its rows read after its own walk, is acted on.
            again, reached_again, _parents = self._pass(store)
            result.orphans = [layer for layer in result.orphans if layer in again.orphans]
            result.adopted = [layer for layer in result.adopted if layer in again.adopted]
            result.unreadable += again.unreadable
            reached |= reached_again
            safe = not result.unreadable
            store.repair_layers({layer: parents.get(layer) for layer in result.adopted}, reached, safe)
            if safe:
                result.deleted = self.collect(store, store.tombstones())
                result.deleted += [layer for layer in result.orphans if self._rmtree(layer)]
                self.trash.flush()
        return result

    def _pass(self, store: Refs) -> tuple[Scan, set[str], dict[str, str | None]]:
        """One walk of every chain, then the rows and the files: what they disagree on, the
        layers reached, and each reached layer's parent."""
        result = Scan()
        for layer in store.tombstones():
            result.tombstoned.append(layer)
        reached: set[str] = set()
        parents: dict[str, str | None] = {}
        for root in self._roots(s.layer for s in store.list_snapshots()):
            try:
                files = _reach(root)
            except (OSError, ValueError, StorageError) as exc:
                result.unreadable.append(f"{root.relative_to(self.home.root)}: {exc}")
                continue
            ids = [_layer_of_path(p) for p in files]
            for i, layer in enumerate(ids):
                if layer is not None:
                    reached.add(layer)
                    parents.setdefault(layer, ids[i + 1] if i + 1 < len(ids) else None)
        rows, expected = store.layer_counts()
        on_disk = self.layer_ids()
        tombs = set(result.tombstoned)
        for layer in sorted(on_disk - set(rows) - tombs):
            (result.adopted if layer in reached else result.orphans).append(layer)
        result.missing = sorted(set(rows) - on_disk)
        result.miscounted = {
            layer: (refs, expected.get(layer, 0))
            for layer, (_p, refs) in rows.items()
            if refs != expected.get(layer, 0)
        }
        return result, reached, parents

    def layer_ids(self) -> set[str]:
        """Every layer with a file (or, from before layers/all/, a directory) now."""
        legacy = {e for e in _listdir(self.root) if not e.startswith(".") and e != LAYER_DIR}
        return legacy | {e.removesuffix(LAYER_SUFFIX) for e in _listdir(self.all) if e.endswith(LAYER_SUFFIX)}

    def layer_files(self) -> list[Path]:
        """Every layer file now (layers removed meanwhile are left out)."""
        files = (self.layer_path(layer) for layer in self.layer_ids())
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


class Trash:
    """Deletion off the caller's path. What an operation made unreachable (a tombstoned
    layer, a removed box's directory, a restore's dropped top) is renamed into this
    process's ``tmp/trash-<pid>-*`` -- one metadata write, where deleting a file's blocks
    costs milliseconds -- and a background thread deletes it after syncing what the
    deletion depends on: the directories whose renames stopped using it and the store's
    commits (WAL with synchronous=NORMAL may lose the last ones on power loss). A process
    that dies first leaves its trash to start-up recovery (:meth:`LayerStore.recover_trash`)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._dir: Path | None = None
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._busy = False  # jobs queued or being done
        self._worker: threading.Thread | None = None  # one per process, started on first use

    def discard(
        self,
        items: Iterable[tuple[Path, str]],
        synced: Iterable[Path] = (),
        durable: Callable[[], None] | None = None,
        then: Callable[[], None] | None = None,
    ) -> list[Path]:
        """Move each ``(path, name)`` (a file or directory; one gone already is skipped)
        into the trash under ``name`` and have it deleted in the background: after
        syncing ``synced`` and calling ``durable``; ``then`` after (forgetting
        tombstones). Returns the paths moved."""
        job = _Job(set(synced), durable, then)
        with self._cond:  # moved and queued at once: never deleted before its own syncs
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{os.getpid()}-", dir=self.tmp))
            for path, name in items:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, self._dir / name)
                    job.moved.append((path, self._dir / name))
            self._jobs.append(job)
            self._busy = True
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="boxvm-trash", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return [path for path, _ in job.moved]

    def flush(self) -> None:
        """Wait until what the trash holds is deleted."""
        with self._cond:
            while self._busy:
                self._cond.wait()

    def _run(self) -> None:
        """The worker: waits for jobs (a daemon thread: a process that exits with jobs
        queued leaves them to start-up recovery)."""
        while True:
            with self._cond:
                while not self._jobs:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
            # Let the operation that queued the job return first, and batch what follows it
            # (one sync for all): a worker competing for the GIL and the CPUs meanwhile cost
            # the caller 1-3 ms under load, in thread handoffs.
            time.sleep(SETTLE_SECS)
            with self._cond:
                jobs, self._jobs = self._jobs, []
            try:
                for directory in set().union(*(job.synced for job in jobs)):
                    with contextlib.suppress(FileNotFoundError):
                        fsync_dir(directory)
                for durable in {job.durable for job in jobs if job.durable is not None}:
                    durable()
                for job in jobs:
                    for _path, held in job.moved:
                        if held.is_dir() and not held.is_symlink():
                            shutil.rmtree(held, ignore_errors=True)
                        else:
                            held.unlink(missing_ok=True)
                    if job.then is not None:
                        job.then()
            except Exception as exc:  # what is left is start-up recovery's
                log.warning("could not empty the trash: %s", exc)


@dataclass
class _Job:
    synced: set[Path]
    durable: Callable[[], None] | None
    then: Callable[[], None] | None
    moved: list[tuple[Path, Path]] = field(default_factory=list)


def _listdir(path: Path) -> list[str]:
    """Entries of a directory that may be removed meanwhile (then: none)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass
class Scan:
    """What :meth:`LayerStore.scan` found (layer ids, and roots for ``unreadable``)."""

    unreadable: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # files no row knows and no chain reaches
    adopted: list[str] = field(default_factory=list)  # files no row knows that a chain reaches
    missing: list[str] = field(default_factory=list)  # rows whose file is gone
    tombstoned: list[str] = field(default_factory=list)
    miscounted: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (recorded, actual)
    deleted: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.unreadable or self.orphans or self.adopted or self.missing or self.tombstoned
                    or self.miscounted)  # fmt: skip


def layer_of(path: Path) -> str | None:
    """The layer a qcow2 file backs onto (None: an image base or nothing); one header read."""
    return _layer_of_reference(qcow2.read_header(path).backing_file)


def backing_of(path: Path) -> Path | None:
    """The file a qcow2 backs onto (None: none, or it cannot be read)."""
    try:
        return _backing_path(path)
    except (OSError, ValueError, StorageError):
        return None


def _backing_path(path: Path) -> Path | None:
    """The file a qcow2 backs onto (None: none); one header read."""
    backing = qcow2.read_header(path).backing_file
    return None if backing is None else Path(os.path.normpath(qcow2.resolve_backing(path, backing)))


def beneath(path: Path, root: Path) -> bool:
    """``path`` is a regular file inside ``root``, links resolved (a name a header gave)."""
    real = Path(os.path.realpath(path))
    return real.is_relative_to(os.path.realpath(root)) and real.is_file()


def _layer_of_reference(backing: str | None) -> str | None:
    match = _REFERENCE.match(backing) if backing else None
    return (match.group(1) or match.group(2)) if match else None


def _layer_of_path(path: Path) -> str | None:
    if path.parent.name == LAYER_DIR and path.parent.parent.name == "layers" and path.name.endswith(LAYER_SUFFIX):
        return path.name.removesuffix(LAYER_SUFFIX)
    return path.parent.name if path.name == LAYER_FILE and path.parent.parent.name == "layers" else None


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
    return [p for p in chain if p.name in (TOP, PENDING) or _layer_of_path(p) is not None]


_SYNCERS = ThreadPoolExecutor(8, thread_name_prefix="boxvm-fsync")


def guest_reference(box_dir: Path, rootfs: Path) -> str:
    """How a box's guest top names the bundle's root filesystem it is over."""
    return os.path.relpath(rootfs, box_dir)


def fsync_files(paths: list[Path]) -> None:
    """Make several new files durable at once: their fsyncs run side by side, and the
    filesystem's journal commits them together (two files: ~1.4 ms here, one after the
    other ~2.4 ms)."""
    waits = [_SYNCERS.submit(_fsync, path) for path in paths[1:]]
    if paths:
        _fsync(paths[0])
    for wait in waits:
        wait.result()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file or directory created or renamed in it) durable."""
    _fsync(path, os.O_DIRECTORY)


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
