"""The runner: one Ray actor per node that owns that node's boxes.

It embeds a ``Runtime`` over a ``LocalBackend`` on the node's own home rather than starting
``boxvm serve``: Ray already gives the actor an RPC channel, pickling and failure detection,
so a second server would only add a port, a token and a process to supervise; the runner's
death is then the one failure a handle sees. Each box keeps its own supervisor process, so
its VM outlives a runner crash and a new runner on the same home finds it again.

Ray runs async actor methods on one event loop: capacity checks and their reservations are
made with no ``await`` between them, so two creates can never both take the last cpu.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxvm import locks, objstore
from boxvm.errors import AlreadyExists, BoxNotFound, BoxvmError, EngineError, InvalidArgument, InvalidState, NotFound
from boxvm.options import BoxInfo, BoxOptions, CloneOptions, ExecResult, SnapshotInfo, SnapshotOptions
from boxvm.ray.errors import NoCapacity, RunnerUnavailable
from boxvm.runtime import Box, Runtime
from boxvm.status import BoxStatus

log = logging.getLogger("boxvm.ray")
COPY_LIMIT = 256 << 20  # bytes of one copy_in/copy_out tar: it crosses Ray in memory
SEED_NAME = re.compile(r"seed-[0-9a-f]{24}")  # the boxes a fork imports, one per archive URL; never started
SEED_SNAPSHOT = "seed"  # a seed's snapshot: this and which archive it holds (``_mark``)
# A box holds its node's cpus and memory while its VM may run; at rest it holds none.
_AT_REST = frozenset({BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.SUSPENDED, BoxStatus.FAILED})
_CALLS_KEPT = 4096  # ended calls whose boxes a pool may still discard
_EXIT_AFTER_CLOSE = 5.0  # seconds a runner no pool uses lives on after its close (its answer sent)


@dataclass(frozen=True)
class NodeLoad:
    """A node's capacity (Ray's resources of the node) and what its boxes hold of it."""

    node_id: str
    cpus: float
    memory_mib: int
    used_cpus: float
    used_memory_mib: int
    boxes: int

    @property
    def free_cpus(self) -> float:
        return self.cpus - self.used_cpus

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.used_memory_mib

    def fits(self, cpus: float, memory_mib: int, count: int = 1) -> bool:
        return self.free_cpus >= cpus * count and self.free_memory_mib >= memory_mib * count


def seed_name(url: str) -> str:
    """The name of the box an archive URL is imported as on a node, found again by any later
    fork of the same URL (its snapshot says which object at the URL it holds: ``_mark``)."""
    return "seed-" + hashlib.sha256(url.encode()).hexdigest()[:24]


async def _mark(url: str) -> str:
    """The name of a seed's snapshot: which archive at ``url`` it was imported from. Objects
    are create-only, but a retired one is deleted and its URL may be published again (and
    a node whose runner was lost at the retire still holds the old import): a seed is
    reused only for the same object (ETag and version id) or file (inode, size, mtime)."""
    if objstore.is_url(url):
        what = await objstore.identity(objstore.parse(url))
    else:
        try:
            st = await asyncio.to_thread(os.stat, url)
        except FileNotFoundError:
            raise NotFound(f"no archive at {url}") from None
        what = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return f"{SEED_SNAPSHOT}-{hashlib.sha256(what.encode()).hexdigest()[:24]}"


class Runner:
    """The boxes of one Ray node (made a Ray actor by ``boxvm.ray.pool``)."""

    def __init__(self, home: str | None, node_id: str, cpus: float, memory_mib: int, actor: bool = False) -> None:
        self.node_id = node_id
        self._rt = Runtime(home)
        self._cpus = cpus
        self._memory_mib = memory_mib
        self._held: dict[int, tuple[float, int]] = {}  # reservations of boxes being created or started
        self._tickets = itertools.count()
        self._calls: dict[str, asyncio.Future[list[str]]] = {}  # token -> the ids its call made, once ended
        self._naming: set[str] = set()  # the names the calls under way are making
        self._dropped: set[str] = set()  # calls discarded before they began: they never will
        self._pools: set[str] = set()  # the pools using this runner (``attach``): it ends with the last
        self._closing = False
        self._actor = actor  # a Ray actor's process, which ends itself after its last close
        self._recovery = asyncio.Lock()
        self._recovered = False  # the calls a runner of this home died in are undone

    # -- the pools using it -------------------------------------------------------------
    async def attach(self, pool: str) -> NodeLoad:
        """Serve ``pool`` too (pools share a node's runner: it is named after the node). The
        first attach undoes the calls a runner of this home died in (``_undo_dead_calls``)."""
        if self._closing:
            raise RunnerUnavailable(
                f"the boxvm runner of Ray node {self.node_id[:12]} is being ended by another pool: start_runners again"
            )
        async with self._recovery:  # a second pool waits for the first one's
            if not self._recovered:
                await self._undo_dead_calls()
                self._recovered = True
            if self._closing:
                raise RunnerUnavailable(f"the boxvm runner of Ray node {self.node_id[:12]} ended: start_runners again")
            self._pools.add(pool)
        return await self.load()

    async def close(self, pool: str, remove_boxes: bool) -> bool:
        """``pool`` is done with this runner; with ``remove_boxes`` every box of the node goes
        first (boxes are the node's, not a pool's). True once no pool uses the runner: it
        stops serving and may be ended. A failed removal leaves the pool attached."""
        if remove_boxes:
            for info in await self._rt.list():
                with contextlib.suppress(BoxNotFound):
                    await self._rt.remove(info.id, force=True)
        self._pools.discard(pool)
        if self._pools:
            return False
        self._closing = True
        try:
            await self._rt.close()
        finally:
            if self._actor:
                # The pool kills it; if it cannot (interrupted, or it gave up waiting), the runner
                # ends itself, or it would refuse every pool's attach for the life of its owner.
                asyncio.get_running_loop().call_later(_EXIT_AFTER_CLOSE, os._exit, 0)
        return True

    # -- capacity ---------------------------------------------------------------------
    async def load(self) -> NodeLoad:
        infos = await self._rt.list()
        live = [i for i in infos if i.status not in _AT_REST]
        cpus = sum(i.cpus for i in live) + sum(c for c, _m in self._held.values())
        memory = sum(i.memory_mib for i in live) + sum(m for _c, m in self._held.values())
        return NodeLoad(self.node_id, self._cpus, self._memory_mib, cpus, memory, len(infos))

    async def _reserve(self, cpus: int, memory_mib: int, count: int) -> int:
        """Hold room for ``count`` boxes about to run, or raise NoCapacity. The check and the
        hold happen with no await between them (the actor's loop runs one step at a time)."""
        load = await self.load()
        if not load.fits(cpus, memory_mib, count):
            raise NoCapacity(
                f"Ray node {self.node_id[:12]} has {load.free_cpus:g} free cpus and {load.free_memory_mib} MiB "
                f"free memory, not enough for {count} box(es) of {cpus} cpu(s) and {memory_mib} MiB: "
                "place them on another node or stop boxes here"
            )
        ticket = next(self._tickets)
        self._held[ticket] = (cpus * count, memory_mib * count)
        return ticket

    # -- boxes ------------------------------------------------------------------------
    async def _box(self, box_id: str) -> Box:
        box = await self._rt.get(box_id)
        if box is None:
            raise BoxNotFound(f"Ray node {self.node_id[:12]} has no box {box_id!r}: it was removed")
        return box

    async def create(self, options: BoxOptions, names: list[str | None], start: bool, token: str) -> list[BoxInfo]:
        """New boxes, created (and started) together; all or none: a failure removes the rest
        (``token`` names the call for ``discard``)."""
        options.validate()
        names = [name or f"box-{secrets.token_hex(4)}" for name in names]  # named: a dead runner's are found again
        async with self._call(token, names) as made:
            ticket = await self._reserve(options.cpus, options.memory_mib, len(names)) if start else None
            try:
                results = await asyncio.gather(
                    *(self._create(options, n, start) for n in names), return_exceptions=True
                )
            finally:
                self._held.pop(ticket, None)  # type: ignore[arg-type]
            done = [r for r in results if isinstance(r, BoxInfo)]
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                for info in done:
                    with contextlib.suppress(BoxvmError):
                        await self._rt.remove(info.id, force=True)
                raise failed[0]
            made(done)
            return done

    async def _create(self, options: BoxOptions, name: str | None, start: bool) -> BoxInfo:
        box = await self._rt.create(options, name)
        try:
            return await box.start() if start else await box.info()
        except BaseException:
            await self._discard(box)
            raise

    async def list(self) -> list[BoxInfo]:
        return [i for i in await self._rt.list() if not SEED_NAME.fullmatch(i.name)]

    async def info(self, box_id: str) -> BoxInfo:
        return await (await self._box(box_id)).info()

    async def start(self, box_id: str) -> BoxInfo:
        box = await self._box(box_id)
        info = await box.info()
        ticket = await self._reserve(info.cpus, info.memory_mib, 1) if info.status in _AT_REST else None
        try:
            return await box.start()
        finally:
            self._held.pop(ticket, None)  # type: ignore[arg-type]

    async def stop(self, box_id: str, timeout: float) -> BoxInfo:
        return await (await self._box(box_id)).stop(timeout)

    async def remove(self, box_id: str, force: bool) -> None:
        await self._rt.remove(box_id, force)

    async def exec(self, box_id: str, argv: list[str], kwargs: dict[str, Any]) -> ExecResult:
        return await (await self._box(box_id)).exec(argv, **kwargs)

    async def put(self, box_id: str, box_path: str, tar: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield tar

        await self._rt.backend.put_files((await self._box(box_id)).id, box_path, chunks())

    async def get(self, box_id: str, box_path: str) -> bytes:
        stream = await self._rt.backend.get_files((await self._box(box_id)).id, box_path)
        return await collect(stream, f"{box_path} in box {box_id}")

    async def snapshot(self, box_id: str, name: str, options: SnapshotOptions) -> SnapshotInfo:
        return await (await self._box(box_id)).snapshot.create(name, options)

    async def snapshots(self, box_id: str) -> list[SnapshotInfo]:
        return await (await self._box(box_id)).snapshot.list()

    async def clone(self, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxInfo]:
        """Copy-on-write clones on this node; with ``start_after_clone`` they must fit (else
        NoCapacity) and start together (the backend would start them one by one); all or none.
        Clones of a memory snapshot are started by the backend, which resumes each one's
        processes from it (a start of a clone would boot it from its disk). Names given are
        held meanwhile, as a create's are (a create's journal must name only its own)."""
        async with self._naming_them([n for n in names if n]):
            return await self._clone(box_id, names, options)

    async def _clone(self, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxInfo]:
        box = await self._box(box_id)
        info = await box.info()
        start = options.start_after_clone
        ticket = await self._reserve(info.cpus, info.memory_mib, len(names)) if start else None
        try:
            if start and options.from_snapshot is not None:
                snapshot = await box.snapshot.get(options.from_snapshot)
                if snapshot is not None and snapshot.has_memory:
                    return await self._resumed(box, info, names, options)
            clones = await box.clone_many(len(names), dataclasses.replace(options, start_after_clone=False), names)
            if not start:
                return [await c.info() for c in clones]
            results = await asyncio.gather(*(c.start() for c in clones), return_exceptions=True)
        finally:
            self._held.pop(ticket, None)  # type: ignore[arg-type]
        started = [r for r in results if isinstance(r, BoxInfo)]
        if len(started) < len(results):
            for c, r in zip(clones, results, strict=True):
                await self._discard(c, failed=isinstance(r, BaseException))
            raise next(r for r in results if isinstance(r, BaseException))
        return started

    async def _resumed(self, box: Box, info: BoxInfo, names: list[str | None], options: CloneOptions) -> list[BoxInfo]:
        """Clones the backend resumes from a memory snapshot; all or none: named here, so that
        the siblings of one whose resume failed can be found and removed. The backend makes
        all the clones' records at once, after checking their names: a name refused means
        none was made (and a box of that name is someone else's)."""
        named = [n or f"{info.name[:100]}-{secrets.token_hex(4)}" for n in names]
        try:
            return [await c.info() for c in await box.clone_many(len(named), options, named)]
        except (AlreadyExists, InvalidArgument):
            raise
        except BaseException:
            for made in [b for n in named if (b := await self._rt.get(n)) is not None]:
                await self._discard(made)
            raise

    async def _discard(self, box: Box, failed: bool = True) -> None:
        """Remove a box of a failed create or clone; the console of one whose start failed is
        kept in the runner's log (Ray's worker logs of the node), since the box's own log goes."""
        with contextlib.suppress(BoxvmError):
            if failed:
                log.warning("boxvm runner on %s: box %s failed to start; its console:\n%s", self.node_id[:12],
                            box.name, (await box.logs())[-16000:])  # fmt: skip
        with contextlib.suppress(BoxvmError):
            await self._rt.remove(box.id, force=True)

    async def export(self, box_id: str, url: str, snapshot: str | None) -> str:
        """Publish the box (or one of its snapshots, through a transient clone) at ``url``. A
        memory snapshot's clone is a fork left suspended, never run: its archive carries the
        snapshot's memory, and the forks of it on every node resume its processes."""
        box = await self._box(box_id)
        if snapshot is None:
            return str(await box.export(url))
        found = await box.snapshot.get(snapshot)
        if found is None:
            raise NotFound(f"box {box.name!r} has no snapshot named {snapshot!r}")
        name = f"{box.name[:100]}-publish-{secrets.token_hex(4)}"
        async with self._call(secrets.token_hex(16), [name]):  # a runner dying here: its next one removes the twin
            if found.has_memory:  # the backend's clones before it resumes them (the runner's home is local)
                options = CloneOptions(from_snapshot=snapshot, start_after_clone=True)
                (record,) = await self._rt.backend.clones.clone(box.id, [name], options)
                twin = await self._rt.get(record.id)
                assert twin is not None
            else:
                twin = await box.clone(name, CloneOptions(from_snapshot=snapshot))
            try:
                return str(await twin.export(url))
            finally:
                try:
                    await self._rt.remove(twin.id, force=True)
                except BoxvmError as exc:  # the export's own outcome stands
                    log.warning("boxvm runner on %s: could not remove %s after publishing it: %s",
                                self.node_id[:12], name, exc)  # fmt: skip

    async def fork(self, url: str, names: list[str | None], start: bool, token: str) -> list[BoxInfo]:
        """Clones of the archive at ``url``: imported once per node (the seed box), then
        cloned from the seed's snapshot copy-on-write, so N forks share one copy of its disk
        (``token`` names the call for ``discard``)."""
        names = [name or f"fork-{secrets.token_hex(6)}" for name in names]  # not the seed's name + suffix
        async with self._call(token, names) as made, self._seeded(url) as (seed, mark):
            infos = await self._clone(seed.id, names, CloneOptions(from_snapshot=mark, start_after_clone=start))
            made(infos)
            return infos

    @contextlib.asynccontextmanager
    async def _seeded(self, url: str) -> AsyncIterator[tuple[Box, str]]:
        """The node's seed of ``url`` and its snapshot's name (``_mark``), imported if need
        be, and held while the caller clones it: a shared ``flock`` on a file of the home,
        exclusive to import or retire. Runners of other pools over the same home (other Ray
        namespaces) then neither import it twice nor remove each other's import halfway,
        and a retire waits for the clones under way, which still share the lock."""
        name, mark = seed_name(url), await _mark(url)
        path = _seeds_dir(self._rt) / f"{name}.lock"
        fd = await locks.acquire(path, fcntl.LOCK_SH)
        try:
            seed = await self._rt.get(name)
            if seed is None or await seed.snapshot.get(mark) is None:
                os.close(fd)
                fd = -1
                fd = await locks.acquire(path, fcntl.LOCK_EX)
                seed = await self._import_seed(url, name, mark)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # converted in place: no retire comes between
            yield seed, mark
        finally:
            if fd >= 0:
                os.close(fd)

    async def _import_seed(self, url: str, name: str, mark: str) -> Box:
        """Under the seed's exclusive lock: its import, unless another caller made it since.
        Imported trusted, as the pool's own publication: untrusted would cap its forks'
        memory and cpus below what the published box had (and refuse a suspended one over
        the cap)."""
        seed = await self._rt.get(name)
        if seed is not None and await seed.snapshot.get(mark) is not None:
            return seed
        if seed is not None:  # an import a crash cut short, or of an object since replaced at the URL
            await self._rt.remove(seed.id, force=True)
        seed = await self._rt.import_box(url, name)
        try:  # a suspended one's snapshot keeps its memory: the forks resume it
            suspended = (await seed.info()).status == BoxStatus.SUSPENDED
            await seed.snapshot.create(mark, SnapshotOptions(memory=suspended))
        except BaseException:
            await self._rt.remove(seed.id, force=True)
            raise
        return seed

    async def retire(self, url: str) -> bool:
        """Remove this node's seed of ``url``; False if it has none. Its forks keep working: a
        layer goes only with its last user, so their disks keep what they share with it."""
        name = seed_name(url)
        fd = await locks.acquire(_seeds_dir(self._rt) / f"{name}.lock")  # no import or clone of it under way
        try:
            seed = await self._rt.get(name)
            if seed is None:
                return False
            await self._rt.remove(seed.id, force=True)
            return True
        finally:
            os.close(fd)

    async def seeds(self) -> list[str]:
        return [i.name for i in await self._rt.list() if SEED_NAME.fullmatch(i.name)]

    # -- the pool's calls that make boxes, undone when it gives up on them ----------------
    @contextlib.asynccontextmanager
    async def _call(self, token: str, names: list[str]) -> AsyncIterator[Callable[[list[BoxInfo]], None]]:
        """Run a call that makes the boxes ``names``, known by ``token`` to ``discard``. The
        names must be free, on the node and among the calls under way, so that for as long as
        the call runs they are its own; it is journaled in the home meanwhile
        (``<tmp>/raycalls/<token>``, locked by this process), and if the runner dies in it,
        the node's next runner removes the boxes of those names. The call reports the boxes
        it made through the function it is given."""
        if token in self._dropped:
            self._dropped.discard(token)
            raise InvalidState("the pool gave up on this call before it began")
        async with self._naming_them(names):
            with _journal(_calls_dir(self._rt), token, names):
                result: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
                result.add_done_callback(lambda f: f.exception())  # read by a discard, or by no one
                self._calls[token] = result
                for old in [t for t, f in self._calls.items() if f.done()][: max(0, len(self._calls) - _CALLS_KEPT)]:
                    del self._calls[old]  # ended long ago: no pool waits to discard them any more
                try:
                    yield lambda infos: result.set_result([i.id for i in infos])
                except BaseException as exc:
                    if not result.done():
                        result.set_exception(exc)
                    raise
                finally:
                    if not result.done():
                        result.set_exception(InvalidState("the call ended without its boxes"))

    @contextlib.asynccontextmanager
    async def _naming_them(self, names: list[str]) -> AsyncIterator[None]:
        """Hold ``names`` for the boxes the block makes: refused unless free on the node and
        among the calls under way, so that while it runs they are its own."""
        taken = [n for n in names if n in self._naming or await self._rt.get(n) is not None]
        if taken or len(set(names)) < len(names):
            raise AlreadyExists(f"Ray node {self.node_id[:12]} already has (or is making) boxes named {taken or names}")
        self._naming.update(names)
        try:
            yield
        finally:
            self._naming.difference_update(names)

    async def discard(self, token: str) -> list[str]:
        """Undo the call ``token`` the pool gave up on (its caller interrupted, another node
        failed) once it ends: remove the boxes it made (a failed call removed its own).
        One that has not begun never will. Returns the ids removed."""
        result = self._calls.get(token)
        if result is None:
            if len(self._dropped) >= _CALLS_KEPT:  # tokens of calls that never came
                self._dropped.pop()
            self._dropped.add(token)
            return []
        try:
            made = await asyncio.shield(result)
        except BaseException:
            return []
        removed, failed = [], []
        for box_id in made:
            try:
                await self._rt.remove(box_id, force=True)
                removed.append(box_id)
            except BoxNotFound:
                pass
            except BoxvmError as exc:
                failed.append(f"{box_id[:12]}: {exc.message}")
        if failed:
            raise EngineError(f"could not remove the boxes of an abandoned call: {'; '.join(failed)}")
        return removed

    async def _undo_dead_calls(self) -> None:
        """Remove the boxes of the calls a runner of this home died in (their journals, no
        longer locked). Before this runner makes any box, so a name in one is that call's:
        names are unique on a node and no runner served it meanwhile."""
        for journal in sorted(_calls_dir(self._rt).iterdir()):
            with _unlocked(journal) as fd:
                if fd is None:
                    continue  # a live runner's (another namespace over the same home), or gone
                if journal.name.startswith("."):  # its writer died before it was named
                    journal.unlink(missing_ok=True)
                    continue
                try:
                    names = json.loads(os.read(fd, 1 << 20))
                except ValueError:
                    names = []
                for name in names if isinstance(names, list) else []:
                    box = await self._rt.get(str(name))
                    if box is not None and box.name == name:
                        log.warning("boxvm runner on %s: removing box %s of a call its runner died in",
                                    self.node_id[:12], name)  # fmt: skip
                        with contextlib.suppress(BoxNotFound):
                            await self._rt.remove(box.id, force=True)
                journal.unlink(missing_ok=True)


@contextlib.contextmanager
def _unlocked(path: Path) -> Iterator[int | None]:
    """``path`` open and locked by this process while the block runs (its writer is dead),
    or None if a live process holds its lock (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _journal(folder: Path, token: str, names: list[str]) -> Iterator[None]:
    """``folder/token`` naming ``names`` while the block runs, locked by this process: written
    and locked under a name of its own first, so no runner's recovery ever reads it empty."""
    tmp = folder / f".{token}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(names).encode())
        os.link(tmp, folder / token)
        tmp.unlink()
        try:
            yield
        finally:
            (folder / token).unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


def _seeds_dir(rt: Runtime) -> Path:
    path = rt.backend.home.tmp / "rayseeds"  # the seeds' lock files (``_seeded``); kept, like raycalls
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _calls_dir(rt: Runtime) -> Path:
    path = rt.backend.home.tmp / "raycalls"  # no pid in the name: the home's start-up recovery leaves it
    path.mkdir(mode=0o700, exist_ok=True)
    return path


async def collect(stream: AsyncIterator[bytes], what: str) -> bytes:
    """A byte stream into memory, bounded by COPY_LIMIT (it crosses Ray as one object)."""
    parts: list[bytes] = []
    size = 0
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for chunk in stream:
            size += len(chunk)
            if size > COPY_LIMIT:
                raise InvalidArgument(
                    f"{what} is over {COPY_LIMIT >> 20} MiB as a tar stream: copy it through export instead"
                )
            parts.append(chunk)
    return b"".join(parts)


def home_for(template: str | None, node_id: str) -> str | None:
    """The node's boxvm home: ``template`` with ``{node_id}`` (or ``{node}``, its first 12 characters:
    box sockets live under the home and a unix socket path is short) filled in; None lets the
    runner use $BOXVM_HOME (or ~/.boxvm) of its own node."""
    if template is None:
        return None
    return str(Path(template.format(node_id=node_id, node=node_id[:12])).expanduser())
