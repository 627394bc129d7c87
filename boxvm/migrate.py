"""Move a box (stopped, suspended, or running as a suspended one) to another runner,
directly or through a bucket both reach, resumably (issue 16).

Every move is driven by one process and recorded in a journal (``<home>/migrations/<box
name>.json``, in the home of that process) before each next step; a lock beside it keeps a
second driver of the same box out, and the source holds the box for the move (``_hold``: a
lease by the move's nonce) so that a driver in another home is refused before anything
leaves the source; ``release`` gives up a move that has not. A re-run may name the box by its id even once the
source no longer has it (the journals say which name it had). A running (or paused) box is suspended first: its
memory and device state travel in the archive, and once the move is done the target
starts it, which resumes every process where it was (a suspended box stays suspended).
Both ways keep the box's id, and the move marks its import with a random nonce it keeps in
the journal (the target stores it in the box's record, ``BoxInfo.migration``): the target's
box *is* the journal's box only if its id, name and nonce are the journal's, never merely
because a box of that name or id is there (a REST caller may import any archive under a
given id; only the driver knows the nonce). A move is not begun if the target already has a
box of that name or id, or is too old to keep the id and nonce.

**Directly** (no ``via``): the source's export stream is the body of the target's REST
import (``Backend.import_stream`` with ``box_id``); nothing is written in between and the
target verifies the whole archive before the box exists there.

1. ``started``: the box is exported into the target's import, unless the target already
   holds the journal's box (an import that committed before its answer was lost, or before
   a retried upload was refused as a duplicate). Another box under that id stops the move
   here, with the box still at the source.
2. ``imported``: the target committed the box. From that commit on the **target owns the
   box**: the source's copy is a leftover, never started by a move, and is removed.
3. ``released``: the source's copy is gone; the target starts the box if it was running,
   and the journal is deleted.

Until the target's commit the source owns the box and the target has nothing of it (a
killed export or import, on either side or in the driver, ends an unfinished upload that
the target drops). From the commit until step 3 both list it, and the target's copy is
the one that counts: the journal's box on the target says so even when the driver died
before it recorded ``imported``, and a re-run records it then. The source removes its copy
only after that commit, so a crash never leaves the box nowhere; and the target's copy is
started only after the source's is removed (the source's is removed without force: one
started there by hand meanwhile is refused, not destroyed), so a suspended box's memory
is never resumed on both.

**Through a bucket** (``via``, ``s3://bucket/prefix/``): the archive goes through a new
object ``<via><name>-<random>.boxsnap``.

1. ``started``: the box's archive is exported to the object (create-only). A re-run exports
   to a new object (the old one deleted at the end): an earlier run may have exported and
   died before recording it, and the box, still the source's, may have run there since.
2. ``exported``: the box is removed from the source. From here the object, named in the
   journal, holds the box: no runner lists it until step 3.
3. ``released``: the target imports the object under the box's name, id and nonce (verified
   before it exists; a re-run that finds the journal's box there moves on; another box under
   that id stops the move with the object kept).
4. ``imported``: the target starts the box if it was running; then the objects are deleted
   with this process's S3 settings (a failure is warned of: the box is moved) and the
   journal with them.

So at every instant exactly one of the source, the object (steps 2-3) or the target owns
the box, whichever side is killed: a killed export leaves no object and the box at the
source, a killed import leaves nothing at the target.

Every step of both is idempotent, so running ``migrate`` again finishes the move. A target
killed while it starts the moved box leaves it ``starting`` until the box's supervisor, which
runs on, has resumed it; killed before that supervisor ran, the target's recovery puts the box
back to ``suspended`` with its memory state (``state/starting``), and the re-run resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from boxvm import faults, objstore
from boxvm.backends.base import Backend
from boxvm.errors import AlreadyExists, BoxNotFound, BoxvmError, InvalidArgument, InvalidState, Unsupported
from boxvm.options import BoxInfo, ExportOptions
from boxvm.paths import Home
from boxvm.status import BoxStatus

log = logging.getLogger("boxvm")

_PHASES = ("started", "exported", "released", "imported")
_START_SETTLES = 90.0  # seconds: longer than a target waits on a start whose process died
_MOVABLE = frozenset(
    {BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.SUSPENDED, BoxStatus.RUNNING, BoxStatus.PAUSED}
)
_UP = (BoxStatus.RUNNING, BoxStatus.PAUSED)


@dataclass
class Journal:
    box_id: str
    box_name: str
    target: str  # the target runner (its URL, or its home for a local one)
    object: str  # s3://… of the archive in transit; "" for a direct move
    phase: str = "started"
    resume: bool = False  # it was running: suspend at the source, start (resume) on the target
    nonce: str = ""  # this move's mark on the target's box (random; "" only in a journal from before nonces)
    stale: list[str] = field(default_factory=list)  # objects of earlier export attempts, deleted at the end


def _where(backend: Backend) -> str:
    url = getattr(backend, "url", None)
    return str(url) if url else str(backend.journal_dir.parent if backend.journal_dir else "?")


def _journal_dir(source: Backend) -> Path:
    root = source.journal_dir.parent if source.journal_dir is not None else Home.default().root
    folder = root / "migrations"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _save(path: Path, journal: Journal) -> None:
    record = asdict(journal)
    if not record["stale"]:  # a journal an older boxvm can finish unless a re-run made it newer
        del record["stale"]
    tmp = path.with_name(path.name + ".new")
    with tmp.open("w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> Journal | None:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and (newer := set(data) - {f.name for f in fields(Journal)}):
            raise InvalidState(
                f"the migration journal {path} was written by a newer boxvm ({sorted(newer)}): finish it with that"
            )
        journal = Journal(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidState(f"the migration journal {path} is unreadable ({exc}): move it away to start over") from exc
    if journal.phase not in _PHASES:
        raise InvalidState(f"the migration journal {path} has an unknown step {journal.phase!r}")
    return journal


async def migrate(source: Backend, box: str, target: Backend, via: str | None = None) -> BoxInfo:
    """Move ``box`` (id or name) from ``source`` to ``target``, directly (``via`` None) or
    through objects under ``via`` (``s3://bucket/prefix/``), or finish an interrupted move
    of it the way it was begun; the box on the target."""
    if via is not None and (not objstore.is_url(via) or not via.endswith("/")):
        raise InvalidArgument(f"--via {via!r}: give an s3://bucket/prefix/ both runners can reach (ending in '/')")
    folder = _journal_dir(source)
    info = await source.get(box)
    name = info.name if info is not None else _journaled(folder, box)
    with _exclusive(folder / f"{name}.lock", name):
        return await _migrate(source, target, via, folder / f"{name}.json", info, name)


def _journaled(folder: Path, box: str) -> str:
    """The name of the box ``box`` (a name or an id) by the journals in ``folder``: once
    the source no longer has the box, only its journal says which name an id had."""
    if (folder / f"{box}.json").exists():
        return box
    for path in folder.glob("*.json"):
        with contextlib.suppress(InvalidState):
            if (journal := _load(path)) is not None and journal.box_id == box:
                return journal.box_name
    return box


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


async def _migrate(
    source: Backend, target: Backend, via: str | None, path: Path, info: BoxInfo | None, name: str
) -> BoxInfo:
    journal, begun = _load(path), False
    if journal is None:
        if info is None:
            raise BoxNotFound(f"no box named or with id {name!r} on the source, and no unfinished migration of it")
        if info.status not in _MOVABLE:
            raise InvalidState(f"box {name!r} is {info.status}: wait for its operation to end, then migrate it")
        if not await target.receives_migrations():
            raise Unsupported(f"the target {_where(target)} cannot keep a migrating box's id: upgrade it first")
        if await target.get(name) is not None:
            raise AlreadyExists(f"the target already has a box named {name!r}: rename or remove one of them")
        if await target.get(info.id) is not None:
            raise AlreadyExists(f"the target already has a box with the id of {name!r}: remove it there first")
        obj = _object(via, name) if via is not None else ""
        journal = Journal(info.id, name, _where(target), obj, resume=info.status in _UP, nonce=secrets.token_hex(16))
        _save(path, journal)
        begun = True
    elif not journal.nonce and not _past_import(journal):  # begun before moves had nonces: one now
        journal.nonce = secrets.token_hex(16)  # (an import that version did but did not record is not adopted)
        _save(path, journal)
    if journal.target != _where(target):
        raise InvalidState(f"box {name!r} is being moved to {journal.target}: run migrate again with that target")
    elif bool(journal.object) != (via is not None):
        how = f"through {journal.object.rsplit('/', 1)[0]}/ (--via)" if journal.object else "directly (no --via)"
        raise InvalidState(f"box {name!r} is being moved {how}: run migrate again that way to finish it")
    await _hold(source, target, path, journal, begun)
    if journal.object:
        await _through_bucket(source, target, path, journal, begun)
    else:
        await _directly(source, target, path, journal)
    return await _finish(target, path, journal)


def _holder(nonce: str) -> str:
    """What the source holds the box by: derived from the nonce, which marks the box on the
    target and must stay the driver's alone."""
    return hashlib.sha256(b"boxvm-lease:" + nonce.encode()).hexdigest()


def _held(journal: Journal) -> str | None:
    """What this move's requests to the source present: the holder it holds the box by (a
    source holding none lets them through; one holding another's refuses them)."""
    return _holder(journal.nonce) if journal.nonce else None


async def _hold(source: Backend, target: Backend, path: Path, journal: Journal, begun: bool) -> None:
    """Hold the box at the source for this move (``Backend.lease``) while the source owns
    it: a driver in another home moving it too is refused there instead of exporting it to
    a second owner. A move this run began and is refused is not begun (its journal goes);
    one begun before sources held boxes is finished as it was begun."""
    if not journal.nonce or _past_import(journal):
        return
    if await _this(source, journal) is None:
        if begun:  # moved away meanwhile by another driver
            path.unlink(missing_ok=True)
            raise BoxNotFound(f"box {journal.box_name!r} left the source before this move could begin")
        return
    if not journal.object and await _moved(target, journal) is not None:
        return  # the target took it: it is the target's, whoever holds the source's copy
    try:
        await source.lease(journal.box_id, _holder(journal.nonce))
    except Unsupported:
        if begun:
            path.unlink(missing_ok=True)
            raise Unsupported(f"the source {_where(source)} cannot hold a migrating box: upgrade it first") from None
        log.warning("the source cannot hold box %s for this move: finishing it as it was begun", journal.box_name)
    except InvalidState:  # held by another move (a definite answer: any other failure keeps the journal)
        if begun:
            path.unlink(missing_ok=True)
        raise


async def release(source: Backend, box: str, target: Backend, *, force: bool = False) -> None:
    """Give up this home's move of ``box`` while the source still owns the box: the source
    lets it go (only from this move's hold), and the journal and any object it exported
    go. Refused once the target or an object holds the box (only finishing the move keeps it
    whole), or for another target than the journal's. A journal whose move never held the
    box (another move took it first) or whose box left the source goes too. With ``force``
    the source lets the box go from whichever move holds it, this home's journal of it goes
    unchecked: that gives the box two owners if another move is under way or a target took
    it, so only once that is known (a target that is gone, a driver lost with its home)."""
    folder = _journal_dir(source)
    info = await source.get(box)
    name = info.name if info is not None else _journaled(folder, box)
    with _exclusive(folder / f"{name}.lock", name):
        path = folder / f"{name}.json"
        journal = _load(path)
        if journal is None or (info is not None and journal.box_id != info.id):
            if info is None:
                raise BoxNotFound(f"the source has no box named or with id {box!r}: there is nothing to release")
            if not force:
                raise InvalidState(
                    f"no move of box {name!r} was begun from this home: the move holding it is driven from"
                    " elsewhere. Release it there; if it is under way or its target already took the box, releasing"
                    " it here gives the box two owners (--force does, once you know that move was given up)"
                )
            await source.release_lease(info.id, None)
            return
        if journal.object and journal.phase in ("exported", "released"):
            raise InvalidState(f"box {name!r} is in {journal.object} now: run migrate again to finish the move")
        if info is None or await _this(source, journal) is None:  # it left the source: this move holds nothing
            if journal.phase != "started":
                raise InvalidState(f"box {name!r} is on the target now: run migrate again to finish the move")
            await _drop(path, journal)
            return
        if not force:
            if journal.target != _where(target):
                raise InvalidState(f"box {name!r} is being moved to {journal.target}: release it with that target")
            if journal.phase != "started" or (not journal.object and await _moved(target, journal) is not None):
                raise InvalidState(
                    f"the move of box {name!r} is past the point where the target holds the box: run migrate"
                    " again to finish it"
                )
        if journal.nonce:
            try:
                await source.release_lease(info.id, None if force else _holder(journal.nonce))
            except Unsupported:  # a source that holds no box for a move
                pass
            except InvalidState:  # another move holds it: this one never did (it was refused, or interrupted)
                log.warning("box %s is held by another move, not this home's: only this home's journal goes", name)
        await _drop(path, journal)


async def _drop(path: Path, journal: Journal) -> None:
    """Forget a move that never moved the box: its journal, and its objects if it exported
    any (at its start they hold an older copy, never the box)."""
    if journal.phase == "started":
        for obj in filter(None, (journal.object, *journal.stale)):
            await _discard(obj)
    path.unlink(missing_ok=True)


async def _this(backend: Backend, journal: Journal) -> BoxInfo | None:
    """The journal's box on the source: by its id, not by a name someone else may hold."""
    info = await backend.get(journal.box_id)
    return info if info is not None and info.id == journal.box_id else None


def _past_import(journal: Journal) -> bool:
    """Whether the journal records the target's import as done."""
    return journal.phase in (("imported",) if journal.object else ("imported", "released"))


async def _moved(target: Backend, journal: Journal) -> BoxInfo | None:
    """The journal's box on the target: this move's import of it (id, name and nonce), not
    a box someone else imported under its id. A journal from before nonces is past its
    import (else it has one now): its box is the one under its id and name with no nonce."""
    info = await _this(target, journal)
    if info is None or info.name != journal.box_name or info.migration != (journal.nonce or None):
        return None
    return info


async def _imported(target: Backend, journal: Journal, where: str, run: Callable[[], Awaitable[object]]) -> None:
    """Run the target's import, unless this move's import is there already; a refused one
    (the id taken) is this move's only if the box under the id is (an upload retried after
    the target committed it), else the move stops with the box kept ``where`` it is."""
    if await _moved(target, journal) is not None:
        return
    if await target.get(journal.box_id) is None:
        if await target.get(journal.box_name) is not None:  # checked before a byte is sent
            raise AlreadyExists(f"the target has another box named {journal.box_name!r}: rename or remove it")
        with contextlib.suppress(AlreadyExists):
            await run()
    if await _moved(target, journal) is None:
        raise AlreadyExists(
            f"the target has another box with the id or name of {journal.box_name!r}, not imported by this migration: "
            f"the box stays {where}; remove that box on the target, then run migrate again"
        )


async def _suspend(source: Backend, journal: Journal) -> None:
    current = await _this(source, journal)
    if current is None:
        raise BoxNotFound(f"box {journal.box_name!r} is on neither runner: was it removed during its migration?")
    if current.status in _UP:
        await source.suspend(journal.box_id)  # its memory and processes travel in the archive


async def _directly(source: Backend, target: Backend, path: Path, journal: Journal) -> None:
    if journal.phase == "started":

        async def run() -> None:
            await _suspend(source, journal)
            label = f"the archive of box {journal.box_name!r}"
            archive = functools.partial(_exported, source, journal)  # called again by a retried upload
            await target.import_stream(archive, journal.box_name, False, label, journal.box_id, journal.nonce)

        await _imported(target, journal, "at the source", run)
        faults.point("migrate:imported")
        journal.phase = "imported"
        _save(path, journal)
    if journal.phase == "imported":  # the target owns the box: the source's copy goes
        if await _this(source, journal) is not None:
            await source.remove(journal.box_id, False, _held(journal))  # refused if someone started it there meanwhile
        faults.point("migrate:released")
        journal.phase = "released"
        _save(path, journal)


async def _exported(source: Backend, journal: Journal) -> AsyncIterator[bytes]:
    """The box's archive as the source produces it: the body of the target's import."""
    stream = await source.export_stream(journal.box_id, ExportOptions(), _held(journal))
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            yield chunk


async def _through_bucket(source: Backend, target: Backend, path: Path, journal: Journal, begun: bool) -> None:
    if journal.phase == "started":
        await _suspend(source, journal)
        if not begun:
            # An earlier run may have exported to the object and died before it recorded
            # so; the box stayed the source's, may have run there since, and must not be
            # moved as that older state: export to a new object, the old one deleted at the end.
            journal.stale.append(journal.object)
            journal.object = _object(journal.object.rsplit("/", 1)[0] + "/", journal.box_name)
            _save(path, journal)
        await source.export_object(journal.box_id, journal.object, ExportOptions(), _held(journal))
        faults.point("migrate:exported")
        journal.phase = "exported"
        _save(path, journal)
    if journal.phase == "exported":
        if await _this(source, journal) is not None:
            await source.remove(journal.box_id, False, _held(journal))
        faults.point("migrate:released")
        journal.phase = "released"
        _save(path, journal)
    if journal.phase == "released":

        async def run() -> None:
            await target.import_object(journal.object, journal.box_name, False, journal.box_id, journal.nonce)

        await _imported(target, journal, f"in {journal.object}", run)
        faults.point("migrate:imported")
        journal.phase = "imported"
        _save(path, journal)


async def _finish(target: Backend, path: Path, journal: Journal) -> BoxInfo:
    moved = await _settled(target, journal)
    if journal.resume and moved.status in (BoxStatus.SUSPENDED, BoxStatus.FAILED):
        moved = await target.start(moved.id)  # resumes every process where it was (a failed start: boots)
    for obj in filter(None, (journal.object, *journal.stale)):
        await _discard(obj)
    path.unlink(missing_ok=True)
    return moved


async def _discard(obj: str) -> None:
    """Delete an object the move is done with, with this process's S3 settings (the runners
    did the transfers with theirs): a failure is warned of, not raised, once the box is moved."""
    try:
        await objstore.delete(objstore.parse(obj))
    except BoxvmError as exc:
        log.warning("box moved, but %s could not be deleted (%s): delete it with the runners' credentials", obj, exc)


def _object(via: str, name: str) -> str:
    """A new object under ``via`` for the archive of box ``name`` in transit."""
    obj = f"{via}{name}-{secrets.token_hex(8)}.boxsnap"
    objstore.parse(obj)
    return obj


async def _settled(target: Backend, journal: Journal) -> BoxInfo:
    """The moved box on the target once no start of it is under way: a target killed while
    it resumed the box leaves it ``starting`` until its supervisor (which runs on) finishes;
    killed before the supervisor ran, the target's recovery puts it back (``state/starting``)."""
    deadline = time.monotonic() + _START_SETTLES
    while True:
        moved = await _moved(target, journal)
        if moved is None:
            raise BoxNotFound(f"box {journal.box_name!r} vanished from the target right after its migration")
        if moved.status != BoxStatus.STARTING or time.monotonic() > deadline:
            return moved
        await asyncio.sleep(0.5)
