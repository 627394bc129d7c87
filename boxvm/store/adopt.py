"""One-time migration of an existing home to layer references (schema v6).

Homes made before v6 have layer files but no layer rows. Each row is built from one
header: a layer's parent from its own file, a box's layer from its top, a snapshot's
from its record. Layers nothing holds (what the old garbage collection would have
deleted) are tombstoned only if every header in the home could be read: one that
cannot might have been holding them (fail closed; `boxvm doctor --repair` reports it).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from boxvm.disks.layers import LAYER_DIR, LAYER_FILE, LAYER_SUFFIX, TOP, layer_of

log = logging.getLogger("boxvm")


def adopt_layers(db: sqlite3.Connection, home: Path) -> None:
    root = home / "layers"
    files = {e: root / e / LAYER_FILE for e in _listdir(root) if not e.startswith(".") and e != LAYER_DIR}
    for name in _listdir(root / LAYER_DIR):  # (a home made before v6 has none there)
        if name.endswith(LAYER_SUFFIX):
            files[name.removesuffix(LAYER_SUFFIX)] = root / LAYER_DIR / name
    entries = list(files)
    sure = True
    kept = set()
    for entry in entries:
        try:
            parent = layer_of(files[entry])
        except (OSError, ValueError) as exc:
            log.warning("layer %s is unreadable (%s): it is kept; `boxvm doctor` reports it", entry, exc)
            parent, sure = None, False
            kept.add(entry)
        db.execute("INSERT INTO layers VALUES (?, ?, 0)", (entry, parent))
    for (box_id,) in db.execute("SELECT id FROM boxes").fetchall():
        try:
            db.execute("UPDATE boxes SET layer = ? WHERE id = ?", (layer_of(home / "boxes" / box_id / TOP), box_id))
        except (OSError, ValueError) as exc:
            log.warning("box %s: its disk is unreadable (%s): no layer is collected", box_id, exc)
            sure = False
    refs = dict.fromkeys(entries, 0)
    held = db.execute(
        "SELECT layer FROM boxes WHERE layer IS NOT NULL UNION ALL SELECT layer FROM snapshots "
        "UNION ALL SELECT parent FROM layers WHERE parent IS NOT NULL"
    ).fetchall()
    for (layer,) in held:
        if layer in refs:
            refs[layer] += 1
    for layer in kept:
        refs[layer] += 1
    in_directories = _reached_by_directories(home)
    unheld = [layer for layer, n in refs.items() if n == 0 and layer not in in_directories]
    while sure and unheld:  # what the old collection would have deleted, down each chain
        layer = unheld.pop()
        parent = db.execute("DELETE FROM layers WHERE id = ? RETURNING parent", (layer,)).fetchone()[0]
        db.execute("INSERT INTO layer_tombstones VALUES (?)", (layer,))
        if parent in refs:
            refs[parent] -= 1
            if refs[parent] == 0:
                unheld.append(parent)
    for layer, n in refs.items():
        db.execute("UPDATE layers SET refs = ? WHERE id = ?", (n, layer))


def _reached_by_directories(home: Path) -> set[str]:
    """Layers the tops under ``boxes/`` and ``tmp/`` back onto, recorded or not: never
    tombstoned here (an older process may be about to commit one of them)."""
    out = set()
    for parent in (home / "boxes", home / "tmp"):
        for entry in _listdir(parent):
            for top in (parent / entry / TOP, parent / entry / "box" / TOP):
                try:
                    layer = layer_of(top)
                except (OSError, ValueError):
                    continue
                if layer is not None:
                    out.add(layer)
    return out


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
