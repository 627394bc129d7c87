"""Move a box (stopped, suspended, or running as a suspended one) to another runner through a bucket both reach,
resumably (issue 16).

The steps, each recorded in a journal (``<home>/migrations/<box name>.json``, the home of
the process driving the move) before the next begins:

1. ``started``: the box's archive is exported to a new object ``<via><name>-<id>.boxsnap``
   (create-only; a re-run that finds it complete moves on).
2. ``exported``: the box is removed from the source. From here the object, named in the
   journal, holds the box: no runner lists it until step 3.
3. ``released``: the target imports the object under the box's name (verified before it
   exists; a re-run that finds the name there moves on).
4. ``imported``: the object is deleted and the journal with it.

So at every instant exactly one of the source, the object (steps 2-3) or the target owns
the box, whichever side is killed: a killed export leaves no object and the box at the
source, a killed import leaves nothing at the target, and every step is idempotent, so
running ``migrate`` again finishes the move. A running (or paused) box is suspended first:
its memory and device state travel in the archive, and after step 4 the target starts it,
which resumes every process where it was (a suspended box stays suspended).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from boxvm import faults, objstore
from boxvm.backends.base import Backend
from boxvm.errors import AlreadyExists, BoxNotFound, InvalidArgument, InvalidState
from boxvm.options import BoxInfo, ExportOptions
from boxvm.paths import Home
from boxvm.status import BoxStatus

_PHASES = ("started", "exported", "released", "imported")
_START_SETTLES = 90.0  # seconds: longer than a target waits on a start whose process died
_MOVABLE = frozenset(
    {BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.SUSPENDED, BoxStatus.RUNNING, BoxStatus.PAUSED}
)


@dataclass
class Journal:
    box_id: str
    box_name: str
    target: str  # the target runner (its URL, or its home for a local one)
    object: str  # s3://… of the archive in transit
    phase: str = "started"
    resume: bool = False  # it was running: suspend at the source, start (resume) on the target


def _where(backend: Backend) -> str:
    url = getattr(backend, "url", None)
    return str(url) if url else str(backend.journal_dir.parent if backend.journal_dir else "?")


def _journal_dir(source: Backend) -> Path:
    root = source.journal_dir.parent if source.journal_dir is not None else Home.default().root
    folder = root / "migrations"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _save(path: Path, journal: Journal) -> None:
    tmp = path.with_name(path.name + ".new")
    with tmp.open("w") as f:
        json.dump(asdict(journal), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> Journal | None:
    try:
        data = json.loads(path.read_text())
        journal = Journal(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidState(f"the migration journal {path} is unreadable ({exc}): move it away to start over") from exc
    if journal.phase not in _PHASES:
        raise InvalidState(f"the migration journal {path} has an unknown step {journal.phase!r}")
    return journal


async def migrate(source: Backend, box: str, target: Backend, via: str) -> BoxInfo:
    """Move ``box`` (id or name) from ``source`` to ``target`` through objects under ``via``
    (``s3://bucket/prefix/``), or finish an interrupted move of it; the box on the target."""
    if not objstore.is_url(via) or not via.endswith("/"):
        raise InvalidArgument(f"--via {via!r}: give an s3://bucket/prefix/ both runners can reach (ending in '/')")
    folder = _journal_dir(source)
    info = await source.get(box)
    name = info.name if info is not None else box
    with _exclusive(folder / f"{name}.lock", name):
        return await _migrate(source, target, via, folder / f"{name}.json", info, name)


@contextlib.contextmanager
def _exclusive(lock: Path, name: str) -> Iterator[None]:
    """One driver per box at a time (the kernel drops the lock of a killed one)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidState(f"another migrate of box {name!r} is running: wait for it") from None
        yield
        # done: a driver that opened this file meanwhile finds no journal and no box, and stops
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


async def _migrate(source: Backend, target: Backend, via: str, path: Path, info: BoxInfo | None, name: str) -> BoxInfo:
    journal = _load(path)
    if journal is None:
        if info is None:
            raise BoxNotFound(f"no box named or with id {name!r} on the source, and no unfinished migration of it")
        if info.status not in _MOVABLE:
            raise InvalidState(f"box {name!r} is {info.status}: wait for its operation to end, then migrate it")
        if await target.get(name) is not None:
            raise AlreadyExists(f"the target already has a box named {name!r}: rename or remove one of them")
        obj = f"{via}{name}-{secrets.token_hex(8)}.boxsnap"
        objstore.parse(obj)
        resume = info.status in (BoxStatus.RUNNING, BoxStatus.PAUSED)
        journal = Journal(info.id, name, _where(target), obj, resume=resume)
        _save(path, journal)
    elif journal.target != _where(target):
        raise InvalidState(f"box {name!r} is being moved to {journal.target}: run migrate again with that target")
    return await _resume(source, target, path, journal)


async def _resume(source: Backend, target: Backend, path: Path, journal: Journal) -> BoxInfo:
    url = objstore.parse(journal.object)
    if journal.phase == "started":
        current = await source.get(journal.box_id)
        if current is not None and current.status in (BoxStatus.RUNNING, BoxStatus.PAUSED):
            await source.suspend(journal.box_id)  # its memory and processes travel in the archive
        with contextlib.suppress(AlreadyExists):  # our own export completed before a crash (the key is ours)
            await source.export_object(journal.box_id, journal.object, ExportOptions())
        faults.point("migrate:exported")
        journal.phase = "exported"
        _save(path, journal)
    if journal.phase == "exported":
        if await source.get(journal.box_id) is not None:
            await source.remove(journal.box_id, False)
        faults.point("migrate:released")
        journal.phase = "released"
        _save(path, journal)
    if journal.phase == "released":
        if await target.get(journal.box_name) is None:
            await target.import_object(journal.object, journal.box_name, False)
        faults.point("migrate:imported")
        journal.phase = "imported"
        _save(path, journal)
    moved = await _settled(target, journal.box_name)
    if journal.resume and moved.status in (BoxStatus.SUSPENDED, BoxStatus.FAILED):
        moved = await target.start(moved.id)  # resumes every process where it was (a failed start: boots)
    await objstore.delete(url)
    path.unlink(missing_ok=True)
    return moved


async def _settled(target: Backend, name: str) -> BoxInfo:
    """The moved box on the target once no start of it is under way: a target killed while
    it resumed the box leaves it ``starting`` until its supervisor (which runs on) finishes,
    or, killed before the supervisor ran, until the target gives up on that start (a
    minute) and calls it failed."""
    deadline = time.monotonic() + _START_SETTLES
    while True:
        moved = await target.get(name)
        if moved is None:
            raise BoxNotFound(f"box {name!r} vanished from the target right after its migration")
        if moved.status != BoxStatus.STARTING or time.monotonic() > deadline:
            return moved
        await asyncio.sleep(0.5)
