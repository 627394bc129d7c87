"""Boxes and images in SQLite (WAL, foreign keys), with forward-only schema migrations.

Every process (library, CLI, supervisors, server) and every thread in it has its own
connection: a connection shared across threads would interleave their transactions.
Every status change is one compare-and-set update (:meth:`Store.transition`), so two
processes can never both win a transition.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boxvm.errors import AlreadyExists, StorageError
from boxvm.status import RULES, BoxStatus, Operation

# Each entry upgrades the schema from version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE boxes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        image TEXT NOT NULL,
        image_digest TEXT,
        options TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        supervisor_pid INTEGER,
        qemu_pid INTEGER,
        guest_bundle TEXT,
        mac TEXT NOT NULL,
        error TEXT
    );
    CREATE TABLE images (
        digest TEXT PRIMARY KEY,
        reference TEXT NOT NULL,
        config TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # v2: per-box operation timings, exposed through BoxInfo.
    "ALTER TABLE boxes ADD COLUMN timings TEXT NOT NULL DEFAULT '{}';",
    # v3: snapshots, and the state operation (snapshotting, cloning, ...) a box is in,
    # with the pid that owns it so recovery can tell a live one from a crashed one.
    """
    ALTER TABLE boxes ADD COLUMN operation TEXT;
    ALTER TABLE boxes ADD COLUMN operation_pid INTEGER;
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        box_id TEXT NOT NULL REFERENCES boxes(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        layer TEXT NOT NULL,
        created_at REAL NOT NULL,
        consistency TEXT NOT NULL,
        has_memory INTEGER NOT NULL DEFAULT 0,
        timings TEXT NOT NULL DEFAULT '{}',
        UNIQUE (box_id, name)
    );
    """,
    # v4: responses of REST requests made with an Idempotency-Key, so a retry replays
    # the first outcome instead of making a second box or snapshot.
    """
    CREATE TABLE idempotency (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (scope, key)
    );
    """,
    # v5: every name an image was used by (tags, digests, paths) -> its digest.
    """
    CREATE TABLE image_refs (
        reference TEXT PRIMARY KEY,
        digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE
    );
    INSERT INTO image_refs SELECT reference, digest FROM images;
    """,
    # v6: layer references (see "layers" below). Rows for the layers an existing home
    # already has are built from the files by ``adopt_layers`` right after this step.
    """
    ALTER TABLE boxes ADD COLUMN layer TEXT;
    CREATE TABLE layers (
        id TEXT PRIMARY KEY,
        parent TEXT,
        refs INTEGER NOT NULL CHECK (refs >= 0)
    );
    CREATE TABLE layer_pins (id TEXT PRIMARY KEY, layer TEXT NOT NULL, pid INTEGER NOT NULL);
    CREATE TABLE layer_tombstones (id TEXT PRIMARY KEY);
    CREATE INDEX snapshots_layer ON snapshots(layer);
    """,
    # v7: new layers are written as layers/all/<id>.qcow2 (disks/layers.py). No table
    # changes: the version makes an older boxvm refuse the home, since it would read a
    # reference to layers/all/ as "no layer" and release layers still in use.
    "SELECT 1",
    # v8: boxes.operation holds the operation (status.Operation: 'snapshot', 'clone', ...),
    # not the status it is shown as ('snapshotting', ...); an older boxvm would misread it.
    """
    UPDATE boxes SET operation = CASE operation
        WHEN 'snapshotting' THEN 'snapshot' WHEN 'restoring' THEN 'restore' WHEN 'cloning' THEN 'clone'
        WHEN 'exporting' THEN 'export' WHEN 'removing' THEN 'remove' ELSE operation END
    WHERE operation IS NOT NULL;
    """,
    # v9: boxes.fresh: 1 the box's top, 2 its top and its guest top, are empty overlays
    # (over boxes.layer, over its bundle) not made durable yet (disks/layers.py, "Fresh
    # tops"); readers re-create them if a crash lost them; start syncs them and sets 0.
    "ALTER TABLE boxes ADD COLUMN fresh INTEGER NOT NULL DEFAULT 0;",
]


# Python steps run after the SQL step of the same index, in the same transaction.
def _adopt(db: sqlite3.Connection, home: Path) -> None:
    from boxvm.store.adopt import adopt_layers

    adopt_layers(db, home)


AFTER_MIGRATION: dict[int, Callable[[sqlite3.Connection, Path], None]] = {5: _adopt}
IDEMPOTENCY_TTL = 24 * 3600
SCHEMA_VERSION = len(MIGRATIONS)
FRESH_TOP, FRESH_BOTH = 1, 2  # boxes.fresh


@dataclass
class BoxRecord:
    id: str
    name: str
    status: BoxStatus
    image: str
    options: dict[str, Any]
    mac: str
    created_at: float = field(default_factory=time.time)
    image_digest: str | None = None
    started_at: float | None = None
    supervisor_pid: int | None = None
    qemu_pid: int | None = None
    guest_bundle: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    operation: Operation | None = None  # the state operation holding the box (its claim)
    operation_pid: int | None = None
    layer: str | None = None  # the layer the box's top backs onto (None: its image's base disk)
    fresh: int = 0  # FRESH_TOP / FRESH_BOTH: empty tops not yet synced, regenerable (see the v9 step)

    @property
    def shown_status(self) -> BoxStatus:
        """What users see: the status the state operation in progress holds, else the lifecycle status."""
        held = RULES[self.operation].holds if self.operation is not None else None
        return held or self.status


@dataclass
class SnapshotRecord:
    id: str
    box_id: str
    name: str
    layer: str
    consistency: str
    created_at: float = field(default_factory=time.time)
    has_memory: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageRecord:
    digest: str
    reference: str
    config: dict[str, Any]
    size_bytes: int
    created_at: float = field(default_factory=time.time)


_JSON_COLUMNS = {"options", "timings", "config"}
# No migration holds the box (``options.lease``) but ``:_holder``'s (none at all with NULL).
_HELD_BY = "coalesce(json_extract(options, '$.lease'), :_holder) IS :_holder"


class SourceMoved(Exception):
    """A clone's source box changed between the read of its top and the commit (restored,
    started, claimed): the clone is made the long way instead."""


class _Declined(Exception):
    """Rolls back a transaction whose file step declined (nothing was written)."""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._chains: dict[str, tuple[str, ...]] = {}  # layer -> its chain (layer_chain)
        try:
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the boxvm database {path}: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _connect(self) -> sqlite3.Connection:
        try:
            # check_same_thread=False only so close() and the pruning below may close a
            # connection from another thread; each is used by its own thread alone.
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the boxvm database {self.path}: {exc}") from exc
        with self._lock:  # close the connections of threads that have ended
            kept = []
            for ref, conn in self._conns:
                thread = ref()
                if thread is None or not thread.is_alive():
                    conn.close()
                else:
                    kept.append((ref, conn))
            self._conns = [*kept, (weakref.ref(threading.current_thread()), db)]
        return db

    def close(self) -> None:
        with self._lock:
            for _ref, conn in self._conns:
                conn.close()
            self._conns = []
        self._local = threading.local()

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"the database {self.path} has schema version {version} but this boxvm understands "
                    f"up to {SCHEMA_VERSION}: upgrade boxvm (the database was left untouched)"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
                if step in AFTER_MIGRATION:
                    AFTER_MIGRATION[step](db, self.path.parent.parent)  # the home: <home>/db/boxvm.db
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # -- boxes ------------------------------------------------------------------------
    def insert_boxes(self, recs: list[BoxRecord]) -> None:
        """Insert boxes in one transaction: all of a batch appear, or none."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for rec in recs:
                try:
                    self._insert("boxes", rec)
                except sqlite3.IntegrityError as exc:
                    raise AlreadyExists(f"a box named {rec.name!r} already exists: choose another name") from exc
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def insert_box(self, rec: BoxRecord) -> None:
        self.insert_boxes([rec])

    def get_box(self, id_or_name: str) -> BoxRecord | None:
        row = self._db.execute(
            "SELECT * FROM boxes WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
            (id_or_name, id_or_name, id_or_name),
        ).fetchone()
        if row is None and len(id_or_name) >= 6 and all(c in "0123456789abcdef" for c in id_or_name):
            # a unique id prefix, as docker allows (compared literally: LIKE treats '_' as a wildcard)
            rows = self._db.execute(
                "SELECT * FROM boxes WHERE substr(id, 1, ?) = ?", (len(id_or_name), id_or_name)
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return _box(row) if row else None

    def list_boxes(self) -> list[BoxRecord]:
        return [_box(r) for r in self._db.execute("SELECT * FROM boxes ORDER BY created_at")]

    def take_lease(self, box_id: str, holder: str) -> str | None:
        """Compare-and-set of the box's migration lease (``options.lease``): None if it was
        free or ``holder``'s already, and is ``holder``'s now; else why not, read in the same
        transaction: "held" (another's), "exporting" (a free box is not taken while it
        exports: that export, of a driver that takes no lease, may be another move's) or
        "gone"."""
        with self._tx() as db:
            row = db.execute(
                "SELECT json_extract(options, '$.lease'), operation FROM boxes WHERE id = ?", (box_id,)
            ).fetchone()
            if row is None:
                return "gone"
            lease, operation = row
            if lease not in (None, holder):
                return "held"
            if lease is None and operation == Operation.EXPORT.value:
                return "exporting"
            db.execute("UPDATE boxes SET options = json_set(options, '$.lease', ?) WHERE id = ?", (holder, box_id))
        return None

    def lease_of(self, box_id: str) -> str | None:
        row = self._db.execute("SELECT json_extract(options, '$.lease') FROM boxes WHERE id = ?", (box_id,)).fetchone()
        return row[0] if row else None

    def drop_lease(self, box_id: str, holder: str | None) -> bool:
        """Compare-and-delete of the box's migration lease: ``holder``'s (any, with None);
        False if another holds it."""
        cur = self._db.execute(
            "UPDATE boxes SET options = json_remove(options, '$.lease') WHERE id = :_id "
            "AND (:holder IS NULL OR coalesce(json_extract(options, '$.lease'), :holder) = :holder)",
            {"holder": holder, "_id": box_id},
        )
        return cur.rowcount == 1

    def update_box(self, box_id: str, **fields: Any) -> None:
        """Write fields other than the status (which only :meth:`transition` changes)."""
        if "status" in fields:
            raise ValueError("a box's status changes only through Store.transition (compare-and-set)")
        values = _encode(fields)
        sets = ", ".join(f"{k} = :{k}" for k in values)
        self._db.execute(f"UPDATE boxes SET {sets} WHERE id = :_id", {**values, "_id": box_id})

    def transition(
        self,
        box_id: str,
        to: BoxStatus,
        allowed_from: frozenset[BoxStatus] | set[BoxStatus],
        *,
        during_operation: bool = False,
        token: float | None = None,
        **fields: Any,
    ) -> bool:
        """Compare-and-set the status: True only if the box was in ``allowed_from`` (and, with
        ``token``, still holds that start's started_at: another start's box is left alone).

        Requests (start, stop, pause, ...) wait for a state operation's claim to end; a
        fact (the VM exited, a start was aborted) is recorded even during one
        (``during_operation``), or the box would look alive with its VM gone."""
        values = _encode({"status": to, **fields})
        sets = ", ".join(f"{k} = :{k}" for k in values)
        marks = ", ".join(f":_from{i}" for i in range(len(allowed_from)))
        params = {**values, "_id": box_id, **{f"_from{i}": s.value for i, s in enumerate(allowed_from)}}
        unclaimed = "" if during_operation else " AND operation IS NULL"
        if token is not None:
            unclaimed += " AND started_at = :_token"
            params["_token"] = token
        cur = self._db.execute(f"UPDATE boxes SET {sets} WHERE id = :_id AND status IN ({marks}){unclaimed}", params)
        return cur.rowcount == 1

    # The two ends of a start's window (``state/starting``): the start ``token`` (its
    # started_at) still stands, with no supervisor yet. Only one of them can succeed.
    _STANDS = "WHERE id = :_id AND status = 'starting' AND started_at = :_token AND supervisor_pid IS NULL"

    def register_supervisor(self, box_id: str, token: float, pid: int, qemu_pid: int | None) -> bool:
        """The start's supervisor takes the box (False: the start was rolled back)."""
        params = {"pid": pid, "qemu": qemu_pid, "_id": box_id, "_token": token}
        cur = self._db.execute(f"UPDATE boxes SET supervisor_pid = :pid, qemu_pid = :qemu {self._STANDS}", params)
        return cur.rowcount == 1

    def record_start_qemu(self, box_id: str, token: float, pid: int, qemu_pid: int | None) -> bool:
        """The registered supervisor records its QEMU -- only while the box is still its start's
        (False: a stop or remove --force took the box meanwhile and killed with the pids it read)."""
        params = {"qemu": qemu_pid, "_id": box_id, "_token": token, "_pid": pid}
        cur = self._db.execute(
            "UPDATE boxes SET qemu_pid = :qemu WHERE id = :_id AND status = 'starting' AND started_at = :_token"
            " AND supervisor_pid = :_pid",
            params,
        )
        return cur.rowcount == 1

    def roll_back_start(self, box_id: str, token: float, prior: BoxStatus, prior_started_at: float | None) -> bool:
        """Recovery puts a start no supervisor took back to the status it began from."""
        params = {"prior": prior.value, "was": prior_started_at, "_id": box_id, "_token": token}
        sets = "status = :prior, started_at = :was, qemu_pid = NULL, error = NULL"
        cur = self._db.execute(f"UPDATE boxes SET {sets} {self._STANDS}", params)
        return cur.rowcount == 1

    def begin_operation(
        self,
        box_id: str,
        operation: Operation,
        allowed_from: frozenset[BoxStatus],
        pid: int,
        holder: str | None = None,
    ) -> bool:
        """Claim the box for a state operation: True only if none is running, the lifecycle
        status allows it and no migration but ``holder``'s holds the box (for an operation
        that ``moves`` it). Lifecycle transitions wait for the claim to end."""
        marks = ", ".join(f":_from{i}" for i in range(len(allowed_from)))
        params = {"op": operation.value, "pid": pid, "_id": box_id, "_holder": holder}
        params.update({f"_from{i}": s.value for i, s in enumerate(allowed_from)})
        held = f" AND {_HELD_BY}" if RULES[operation].moves else ""
        cur = self._db.execute(
            "UPDATE boxes SET operation = :op, operation_pid = :pid "
            f"WHERE id = :_id AND operation IS NULL AND status IN ({marks}){held}",
            params,
        )
        return cur.rowcount == 1

    def take_over_operation(self, box_id: str, dead_pid: int | None, pid: int) -> bool:
        """Recovery: make a crashed operation's claim ours (only one process finishes it)."""
        cur = self._db.execute(
            "UPDATE boxes SET operation_pid = ? WHERE id = ? AND operation IS NOT NULL AND operation_pid IS ?",
            (pid, box_id, dead_pid),
        )
        return cur.rowcount == 1

    def end_operation(self, box_id: str, timings_ms: dict[str, float] | None = None) -> None:
        self._end_operation(self._db, box_id, timings_ms)

    @staticmethod
    def _end_operation(db: sqlite3.Connection, box_id: str, timings_ms: dict[str, float] | None = None) -> None:
        """End the claim, merging ``timings_ms`` into the box's timings in the same write."""
        patch = json.dumps({k: round(v, 2) for k, v in (timings_ms or {}).items()})
        db.execute(
            "UPDATE boxes SET operation = NULL, operation_pid = NULL, timings = json_patch(timings, ?) WHERE id = ?",
            (patch, box_id),
        )

    @staticmethod
    def _claim_quiet(
        db: sqlite3.Connection,
        box_id: str,
        operation: Operation,
        allowed: frozenset[BoxStatus],
        pid: int,
        layer: str | None,
    ) -> bool:
        """Claim a box at rest whose files agree with its record (its top backs onto
        ``layer``, read just before, with no pending top), in the caller's transaction:
        the claim and the operation's first write become one transaction."""
        marks = ", ".join("?" for _ in allowed)
        cur = db.execute(
            "UPDATE boxes SET operation = ?, operation_pid = ? "
            f"WHERE id = ? AND operation IS NULL AND layer IS ? AND status IN ({marks})",
            (operation.value, pid, box_id, layer, *(s.value for s in allowed)),
        )
        return cur.rowcount == 1

    # -- snapshots --------------------------------------------------------------------
    def insert_snapshot(self, rec: SnapshotRecord) -> None:
        try:
            self._insert("snapshots", rec)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"the box already has a snapshot named {rec.name!r}") from exc

    def get_snapshot(self, box_id: str, name: str) -> SnapshotRecord | None:
        row = self._db.execute("SELECT * FROM snapshots WHERE box_id = ? AND name = ?", (box_id, name)).fetchone()
        return _snapshot(row) if row else None

    def list_snapshots(self, box_id: str | None = None) -> list[SnapshotRecord]:
        if box_id is None:
            rows = self._db.execute("SELECT * FROM snapshots ORDER BY created_at")
        else:
            rows = self._db.execute("SELECT * FROM snapshots WHERE box_id = ? ORDER BY created_at", (box_id,))
        return [_snapshot(r) for r in rows]

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def add_timing(self, box_id: str, **timings_ms: float) -> None:
        """Merge timings in one statement (a read-modify-write would lose a concurrent one's)."""
        patch = json.dumps({k: round(v, 2) for k, v in timings_ms.items()})
        self._db.execute("UPDATE boxes SET timings = json_patch(timings, ?) WHERE id = ?", (patch, box_id))

    def delete_box(self, box_id: str) -> None:
        self._db.execute("DELETE FROM boxes WHERE id = ?", (box_id,))

    # -- layers -----------------------------------------------------------------------
    # A layer row is held by every box whose top backs onto it (boxes.layer), every
    # snapshot of it, every layer backing onto it (layers.parent) and every pin (a clone
    # being staged over it); ``refs`` counts them and changes in the same transaction as
    # the rows that hold. At zero the row becomes a tombstone in that transaction; its
    # file is deleted after the commit by whoever made it, or by recovery (any process
    # may delete a tombstoned layer at any time: nothing can reach it again).

    @contextlib.contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``durable``: its commit reaches the disk before files are
        deleted on its word (WAL with synchronous=NORMAL may lose the last commits on power loss)."""
        db = self._db
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def sync(self) -> None:
        """Make every commit so far durable (one write with synchronous=FULL: the WAL's
        fsync covers every frame before it). Files are deleted on a commit's word only
        after this (see ``disks/layers.py``, ``Trash``), so the operations' own commits
        need not wait for the disk."""
        with self._tx(durable=True) as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('synced_at', ?)", (str(time.time()),))

    @staticmethod
    def _hold(db: sqlite3.Connection, layer: str) -> None:
        if db.execute("UPDATE layers SET refs = refs + 1 WHERE id = ?", (layer,)).rowcount != 1:
            raise StorageError(f"layer {layer} has no record: run `boxvm doctor --repair`")

    @staticmethod
    def _drop(db: sqlite3.Connection, layer: str | None, dead: list[str]) -> None:
        """Release one reference; a layer left with none is tombstoned, and releases its parent."""
        while layer is not None:
            row = db.execute(
                "UPDATE layers SET refs = refs - 1 WHERE id = ? RETURNING refs, parent", (layer,)
            ).fetchone()
            if row is None:  # a chain broken before (a missing file): nothing more to release
                return
            if row[0] > 0:
                return
            db.execute("DELETE FROM layers WHERE id = ?", (layer,))
            db.execute("INSERT OR IGNORE INTO layer_tombstones VALUES (?)", (layer,))
            dead.append(layer)
            layer = row[1]

    def record_capture(
        self,
        box_id: str,
        layer: str,
        parent: str | None,
        snapshot: SnapshotRecord | None = None,
        pin_pid: int = 0,
        release: bool = False,
        fresh: bool = False,
    ) -> str | None:
        """The box's top became ``layer`` (over ``parent``) and it has a new top over it: the
        box's reference moves to the new layer, which holds ``parent`` in its place. With a
        snapshot record, and/or a pin (for clones staged over the layer, returned), and/or
        the end of this process's claim (``release``), in the same transaction. ``fresh``:
        the new top is an unsynced empty overlay (a capture at rest). Idempotent for
        recovery: a capture already recorded is left."""
        with self._tx() as db:
            row = db.execute("SELECT layer FROM boxes WHERE id = ?", (box_id,)).fetchone()
            if row is None:
                raise StorageError(f"box {box_id} has no record")
            if row[0] != layer:
                if row[0] != parent:
                    raise StorageError(f"box {box_id}: its top backs onto {parent}, its record says {row[0]}")
                adopted = db.execute("SELECT parent FROM layers WHERE id = ?", (layer,)).fetchone()
                if adopted is None:
                    db.execute("INSERT INTO layers VALUES (?, ?, 1)", (layer, parent))
                else:
                    self._take_adopted(db, layer, parent, adopted[0])
                db.execute("UPDATE boxes SET layer = ? WHERE id = ?", (layer, box_id))
            if fresh:
                db.execute("UPDATE boxes SET fresh = max(fresh, 1) WHERE id = ?", (box_id,))
            if snapshot is not None:
                self._add_snapshot(db, snapshot, layer)
            if release:
                self._end_operation(db, box_id)
            return self._pin(db, layer, pin_pid) if pin_pid else None

    @staticmethod
    def _take_adopted(db: sqlite3.Connection, layer: str, parent: str | None, adopted_parent: str | None) -> None:
        """A capture recorded after ``doctor --repair`` adopted its layer (its row came later
        than both of repair's passes): the box's reference takes the place of the adoption's
        pin, and the box's reference on ``parent``, which the adopted row holds, goes."""
        if adopted_parent != parent:
            raise StorageError(f"layer {layer} is recorded over {adopted_parent}, its capture over {parent}")
        pins = db.execute("DELETE FROM layer_pins WHERE layer = ? AND pid = 0", (layer,)).rowcount
        db.execute("UPDATE layers SET refs = refs + 1 - ? WHERE id = ?", (pins, layer))
        Store._drop(db, parent, [])  # never the last reference: the adopted row holds it

    def _add_snapshot(self, db: sqlite3.Connection, snapshot: SnapshotRecord, layer: str) -> None:
        """The snapshot row and its hold on ``layer``, inside the caller's transaction."""
        try:
            self._insert("snapshots", snapshot)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"the box already has a snapshot named {snapshot.name!r}") from exc
        self._hold(db, layer)

    def capture_fresh(self, box_id: str, allowed: frozenset[BoxStatus], layer: str, snapshot: SnapshotRecord) -> bool:
        """A snapshot of a box at rest whose top is fresh (an empty overlay over ``layer``,
        the layer its top was just read to back onto): its state *is* ``layer``, so the
        snapshot holds that layer and no file changes. One transaction, which checks that no
        operation holds the box, its status is allowed and its record still says fresh over
        ``layer``; False (nothing changed) if not."""
        marks = ", ".join("?" for _ in allowed)
        with self._tx() as db:
            row = db.execute(
                f"SELECT 1 FROM boxes WHERE id = ? AND operation IS NULL AND fresh > 0 AND layer IS ? "
                f"AND status IN ({marks})",
                (box_id, layer, *(s.value for s in allowed)),
            ).fetchone()
            if row is None:
                return False
            self._add_snapshot(db, snapshot, layer)
            return True

    def adopt_capture(self, box_id: str, layer: str, parent: str | None, exists: Callable[[], bool]) -> bool:
        """Recovery: record a capture whose files were made but whose metadata was not. False
        if ``layer`` is tombstoned or its file is gone (``exists``, asked inside the
        transaction: a tombstone row outlives its file, so this cannot resurrect one)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM layer_tombstones WHERE id = ?", (layer,)).fetchone() or not exists():
                return False
            if db.execute("SELECT 1 FROM layers WHERE id = ?", (layer,)).fetchone():
                return False
        self.record_capture(box_id, layer, parent)
        return True

    @staticmethod
    def _pin(db: sqlite3.Connection, layer: str, pid: int) -> str:
        pin = os.urandom(8).hex()
        Store._hold(db, layer)
        db.execute("INSERT INTO layer_pins VALUES (?, ?, ?)", (pin, layer, pid))
        return pin

    def pin_snapshot(self, box_id: str, name: str, pid: int) -> tuple[SnapshotRecord, str] | None:
        """Hold a snapshot's layer for clones being staged over it, in the transaction that
        finds the snapshot: removing the snapshot meanwhile cannot collect the layer."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM snapshots WHERE box_id = ? AND name = ?", (box_id, name)).fetchone()
            if row is None:
                return None
            snap = _snapshot(row)
            return snap, self._pin(db, snap.layer, pid)

    def unpin(self, pin: str) -> list[str]:
        """Release a pin (clones not made); returns the layers tombstoned."""
        return self._delete_holder("DELETE FROM layer_pins WHERE id = ? RETURNING layer", pin)

    def _delete_holder(self, sql: str, key: str) -> list[str]:
        """Delete one row that holds a layer (``sql`` returns that layer) and release it, in
        one transaction; returns the layers tombstoned."""
        dead: list[str] = []
        with self._tx() as db:
            row = db.execute(sql, (key,)).fetchone()
            if row is not None:
                self._drop(db, row[0], dead)
        return dead

    def release_dead_pins(self, alive: Callable[[int], bool]) -> list[str]:
        """Recovery: pins of processes that died while staging clones."""
        dead: list[str] = []
        pins = self._db.execute("SELECT id, pid FROM layer_pins").fetchall()
        for pin, pid in pins:
            if pid > 0 and not alive(pid):  # pid 0: kept by doctor --repair
                dead += self.unpin(pin)
        return dead

    def insert_clones(
        self, recs: list[BoxRecord], pin: str | None, source: tuple[str, frozenset[BoxStatus], str] | None = None
    ) -> None:
        """Insert clones (each holding its layer), in one transaction: all of a batch appear,
        or none. They were staged under ``pin`` (released here), or, with ``source`` (the box
        they clone, its allowed statuses and the layer its fresh top is over), under no pin:
        the box is checked here to be at rest and still fresh over that layer -- so it holds
        the layer until the clones hold it too -- else :class:`SourceMoved` (nothing changed)."""
        with self._tx() as db:
            if source is not None:
                marks = ", ".join("?" for _ in source[1])
                row = db.execute(
                    "SELECT 1 FROM boxes WHERE id = ? AND operation IS NULL AND fresh > 0 AND layer IS ? "
                    f"AND status IN ({marks})",
                    (source[0], source[2], *(s.value for s in source[1])),
                ).fetchone()
                if row is None:
                    raise SourceMoved(f"box {source[0]} changed while it was being cloned")
            for rec in recs:
                try:
                    self._insert("boxes", rec)
                except sqlite3.IntegrityError as exc:
                    raise AlreadyExists(f"a box named {rec.name!r} already exists: choose another name") from exc
                if rec.layer is not None:
                    self._hold(db, rec.layer)
            if pin is not None:
                row = db.execute("DELETE FROM layer_pins WHERE id = ? RETURNING layer", (pin,)).fetchone()
                if row is None:
                    raise StorageError("the clones' layer pin vanished: run `boxvm doctor --repair`")
                dead: list[str] = []
                self._drop(db, row[0], dead)  # the clones hold it now: never the last reference

    def restore_layer(
        self,
        box_id: str,
        name: str,
        claim: tuple[frozenset[BoxStatus], int, str | None] | None = None,
    ) -> tuple[SnapshotRecord, list[str]] | None:
        """Point the box at a snapshot's layer (found in this transaction); its former
        layer is released. The caller then gives the box a new (fresh) top over the snapshot.
        With ``claim`` (allowed statuses, pid, the layer its top backs onto), the box is
        claimed for the restore in the same transaction; None if it cannot be (or the
        snapshot is gone): the caller then claims it the long way."""
        dead: list[str] = []
        with self._tx() as db:
            row = db.execute("SELECT * FROM snapshots WHERE box_id = ? AND name = ?", (box_id, name)).fetchone()
            if row is None:
                return None
            if claim is not None and not self._claim_quiet(db, box_id, Operation.RESTORE, *claim):
                return None
            snap = _snapshot(row)
            old = db.execute("SELECT layer FROM boxes WHERE id = ?", (box_id,)).fetchone()[0]
            self._hold(db, snap.layer)
            db.execute("UPDATE boxes SET layer = ?, fresh = max(fresh, 1) WHERE id = ?", (snap.layer, box_id))
            self._drop(db, old, dead)
        return snap, dead

    def restore_fresh(
        self,
        box_id: str,
        name: str,
        allowed: frozenset[BoxStatus],
        repoint: Callable[[BoxRecord, SnapshotRecord], bool],
    ) -> tuple[BoxRecord, SnapshotRecord, list[str]] | None:
        """A whole restore of a box at rest whose top is fresh, in one transaction: if no
        operation holds the box (``box_id``: its full id), its status is allowed and its
        record says its top is fresh over a layer, the record moves to the snapshot's layer
        (found here) and ``repoint`` re-points the top in place (``disks/qcow2.repoint_empty``)
        inside the transaction, under SQLite's write lock, so no start or operation meets the
        top half-changed. No claim: nothing sees the box between the check and the commit.
        None, with nothing changed, if the box does not qualify, the snapshot is gone or
        ``repoint`` declines (the caller restores the long way); else the box's record as
        committed, the snapshot and the layers tombstoned. Crash ordering: the record says
        fresh before and after, so whichever of the write and the commit reaches the disk
        first, the top is regenerable from it (docs/ENGINEERING.md, "Fresh tops")."""
        dead: list[str] = []
        try:
            with self._tx() as db:
                row = db.execute("SELECT * FROM boxes WHERE id = ?", (box_id,)).fetchone()
                if row is None or row["operation"] is not None or not row["fresh"] or row["layer"] is None:
                    return None
                rec = _box(row)
                snap_row = db.execute(
                    "SELECT * FROM snapshots WHERE box_id = ? AND name = ?", (box_id, name)
                ).fetchone()
                if rec.status not in allowed or snap_row is None:
                    return None
                snap = _snapshot(snap_row)
                db.execute("UPDATE boxes SET layer = ? WHERE id = ?", (snap.layer, box_id))
                self._hold(db, snap.layer)
                self._drop(db, rec.layer, dead)
                if not repoint(rec, snap):  # the file last: nothing after it can fail the commit
                    raise _Declined
                rec.layer = snap.layer
        except _Declined:
            return None
        return rec, snap, dead

    def set_box_layer(self, box_id: str, layer: str | None) -> list[str]:
        """The box's top now backs onto ``layer`` (an export's capture folded back, a top
        rewritten by recovery); returns the layers tombstoned."""
        dead: list[str] = []
        with self._tx() as db:
            row = db.execute("SELECT layer FROM boxes WHERE id = ?", (box_id,)).fetchone()
            if row is None or row[0] == layer:
                return dead
            if layer is not None:
                self._hold(db, layer)
            db.execute("UPDATE boxes SET layer = ? WHERE id = ?", (layer, box_id))
            self._drop(db, row[0], dead)
        return dead

    def settle_fresh(self, box_id: str) -> None:
        """The box's tops are synced and about to take a guest's writes: no longer fresh.
        Durable before the guest runs: a lost commit would leave the record calling a
        top that holds data regenerable."""
        with self._tx(durable=True) as db:
            db.execute("UPDATE boxes SET fresh = 0 WHERE id = ?", (box_id,))

    def remove_snapshot(self, snapshot_id: str) -> list[str]:
        return self._delete_holder("DELETE FROM snapshots WHERE id = ? RETURNING layer", snapshot_id)

    def remove_box(
        self,
        box_id: str,
        quiet: tuple[frozenset[BoxStatus], str | None] | None = None,
        holder: str | None = None,
    ) -> list[str] | None:
        """Delete a box, its snapshots and their references; returns the layers tombstoned.
        With ``quiet`` (allowed statuses, the layer its top backs onto): only if no
        operation holds it, nor a migration but ``holder``'s, its status is allowed and its
        record names that layer, checked in the same transaction (else None, nothing
        changed) -- no separate claim."""
        dead: list[str] = []
        with self._tx() as db:
            if quiet is not None:
                marks = ", ".join(f":_from{i}" for i in range(len(quiet[0])))
                params = {"_id": box_id, "layer": quiet[1], "_holder": holder}
                params.update({f"_from{i}": s.value for i, s in enumerate(quiet[0])})
                row = db.execute(
                    "SELECT 1 FROM boxes WHERE id = :_id AND operation IS NULL AND layer IS :layer "
                    f"AND status IN ({marks}) AND {_HELD_BY}",
                    params,
                ).fetchone()
                if row is None:
                    return None
            for (layer,) in db.execute("DELETE FROM snapshots WHERE box_id = ? RETURNING layer", (box_id,)).fetchall():
                self._drop(db, layer, dead)
            row = db.execute("DELETE FROM boxes WHERE id = ? RETURNING layer", (box_id,)).fetchone()
            if row is not None:
                self._drop(db, row[0], dead)
        return dead

    def has_layer(self, layer: str) -> bool:
        return self._db.execute("SELECT 1 FROM layers WHERE id = ?", (layer,)).fetchone() is not None

    def layer_chain(self, layer: str | None) -> list[str]:
        """The layers of a chain from ``layer`` down, top first (one query, no file reads).
        Remembered per process: a layer's parent never changes and ids are never reused,
        and whoever holds a layer holds the layers below it, so the chain of a layer a box
        or snapshot names stays what it was (infos read it on every operation)."""
        if layer is None:
            return []
        known = self._chains.get(layer)
        if known is not None:
            return list(known)
        rows = self._db.execute(
            "WITH RECURSIVE up(id, parent, n) AS (SELECT id, parent, 0 FROM layers WHERE id = ? "
            "UNION ALL SELECT l.id, l.parent, up.n + 1 FROM layers l JOIN up ON l.id = up.parent) "
            "SELECT id, parent FROM up ORDER BY n",
            (layer,),
        )
        found = rows.fetchall()
        chain = [r[0] for r in found]
        if found and found[-1][1] is None:  # whole (a missing parent row, a damaged store: not remembered)
            if len(self._chains) >= 4096:  # bounded: a long-lived process meets many layers
                self._chains.clear()
            self._chains[layer] = tuple(chain)
        return chain

    def tombstones(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM layer_tombstones")]

    def forget_tombstones(self, layers: list[str]) -> None:
        """After their files are gone."""
        if layers:
            with self._tx() as db:
                db.executemany("DELETE FROM layer_tombstones WHERE id = ?", [(x,) for x in layers])

    def layer_rows(self) -> dict[str, tuple[str | None, int]]:
        """id -> (parent, refs), for the consistency scan."""
        return {r[0]: (r[1], r[2]) for r in self._db.execute("SELECT id, parent, refs FROM layers")}

    def layer_counts(self) -> tuple[dict[str, tuple[str | None, int]], dict[str, int]]:
        """``layer_rows`` and ``expected_refs`` read in one transaction: the scan compares
        them, and an operation of another process committing between two reads (a box
        removed, its layer's row gone with it) made a count look wrong that was not."""
        db = self._db
        db.execute("BEGIN")
        try:
            return self.layer_rows(), self.expected_refs()
        finally:
            db.execute("COMMIT")

    def expected_refs(self) -> dict[str, int]:
        """What every layer's count should be, from the rows that hold it."""
        rows = self._db.execute(
            "SELECT layer, count(*) FROM (SELECT layer FROM boxes WHERE layer IS NOT NULL "
            "UNION ALL SELECT layer FROM snapshots UNION ALL SELECT parent FROM layers WHERE parent IS NOT NULL "
            "UNION ALL SELECT layer FROM layer_pins) GROUP BY layer"
        )
        return {r[0]: r[1] for r in rows}

    def repair_layers(self, adopt: dict[str, str | None], reached: set[str], may_delete: bool) -> None:
        """doctor --repair: rows for layer files a chain reaches but no row knows (held by a
        permanent pin, pid 0: what holds them is not recorded), every count recomputed from
        the rows that hold, and -- if ``may_delete`` -- rows nothing holds and no chain
        reaches tombstoned, down their chains."""
        with self._tx(durable=True) as db:
            for layer, parent in adopt.items():  # (one whose capture recorded it meanwhile is the capture's)
                if db.execute("INSERT OR IGNORE INTO layers VALUES (?, ?, 0)", (layer, parent)).rowcount:
                    db.execute("INSERT INTO layer_pins VALUES (?, ?, 0)", (os.urandom(8).hex(), layer))
            expected = self.expected_refs()
            parents = {r[0]: r[1] for r in db.execute("SELECT id, parent FROM layers")}
            unheld = [layer for layer in parents if expected.get(layer, 0) == 0 and layer not in reached]
            while may_delete and unheld:
                layer = unheld.pop()
                db.execute("DELETE FROM layers WHERE id = ?", (layer,))
                db.execute("INSERT OR IGNORE INTO layer_tombstones VALUES (?)", (layer,))
                parent = parents[layer]
                if parent in parents:
                    expected[parent] = expected.get(parent, 0) - 1
                    if expected[parent] == 0 and parent not in reached:
                        unheld.append(parent)
            for layer in parents:
                db.execute("UPDATE layers SET refs = ? WHERE id = ?", (max(expected.get(layer, 0), 0), layer))

    # -- idempotency ------------------------------------------------------------------
    def get_response(self, scope: str, key: str) -> tuple[str, int, str] | None:
        """(fingerprint, status, body) stored for a request key within a day."""
        row = self._db.execute(
            "SELECT fingerprint, status, body FROM idempotency WHERE scope = ? AND key = ? AND created_at > ?",
            (scope, key, time.time() - IDEMPOTENCY_TTL),
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def put_response(self, scope: str, key: str, fingerprint: str, status: int, body: str) -> None:
        self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (time.time() - IDEMPOTENCY_TTL,))
        self._db.execute(
            "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
            (scope, key, fingerprint, status, body, time.time()),
        )

    # -- images -----------------------------------------------------------------------
    def put_image(self, rec: ImageRecord) -> None:
        """The image's record, unless it has one: a REPLACE would cascade away the names
        (``image_refs``) another resolve of the same digest just gave it."""
        self._insert("images", rec, "INSERT OR IGNORE")

    def _insert(self, table: str, rec: object, verb: str = "INSERT") -> None:
        values = _encode(rec.__dict__)
        cols = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        self._db.execute(f"{verb} INTO {table} ({cols}) VALUES ({marks})", values)

    def get_image(self, digest: str) -> ImageRecord | None:
        row = self._db.execute("SELECT * FROM images WHERE digest = ?", (digest,)).fetchone()
        return _image(row) if row else None

    def add_image_ref(self, reference: str, digest: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO image_refs VALUES (?, ?)", (reference, digest))

    def image_refs(self) -> dict[str, str]:
        """reference -> digest"""
        return dict(self._db.execute("SELECT reference, digest FROM image_refs ORDER BY reference").fetchall())

    def delete_image(self, digest: str) -> None:
        self._db.execute("DELETE FROM images WHERE digest = ?", (digest,))

    def list_images(self) -> list[ImageRecord]:
        return [_image(r) for r in self._db.execute("SELECT * FROM images ORDER BY created_at")]


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in fields.items():
        if key in _JSON_COLUMNS:
            value = json.dumps(value)
        elif isinstance(value, BoxStatus | Operation):
            value = value.value
        out[key] = value
    return out


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for key in _JSON_COLUMNS & data.keys():
        data[key] = json.loads(data[key])
    return data


def _box(row: sqlite3.Row) -> BoxRecord:
    data = _decode(row)
    data["status"] = BoxStatus(data["status"])
    data["operation"] = Operation(data["operation"]) if data["operation"] else None
    return BoxRecord(**data)


def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
    data = _decode(row)
    data["has_memory"] = bool(data["has_memory"])
    return SnapshotRecord(**data)


def _image(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(**_decode(row))
