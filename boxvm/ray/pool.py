"""``BoxPool``: boxes spread over a Ray cluster, one runner actor per node, and ``BoxRef``
handles that any Ray task on any node can use.

Handles are small (node id, box id, name, the runner's actor handle) and pickle with Ray's own
serialiser; every call on one goes to the runner that owns the box. The calls block (they are
made for Ray tasks, which are plain functions); from async code run them in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.actor import ActorHandle
from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from boxvm import objstore
from boxvm.errors import AlreadyExists, BoxvmError, EngineError, InvalidArgument
from boxvm.options import BoxInfo, BoxOptions, CloneOptions, ExecResult, SnapshotInfo, SnapshotOptions
from boxvm.ray.errors import NoCapacity, RunnerUnavailable
from boxvm.ray.placement import plan
from boxvm.ray.runner import NodeLoad, Runner, collect, home_for
from boxvm.tarstream import receive_tree, tree_chunks

T = TypeVar("T")
log = logging.getLogger("boxvm.ray")
RUNNER_PREFIX = "boxvm-runner-"
_SLOW = 600.0  # seconds a runner may take to retire a seed or close (imports, removals) before it counts as hung


# The Ray errors of a runner that is gone, or of a result lost with its node (ObjectLostError
# covers OwnerDiedError). Any other (a result that would not unpickle, a cancel) is the call's.
_GONE = (RayActorError, ObjectLostError, NodeDiedError, WorkerCrashedError, LocalRayletDiedError)


def _wait(ref: ray.ObjectRef, node_id: str, what: str) -> Any:
    """The result of a runner call; boxvm errors come back as their own class, a dead runner
    as RunnerUnavailable naming the node and what was asked of it."""
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BoxvmError):
            raise cause from None
        raise EngineError(f"{what} failed in the runner of Ray node {node_id[:12]}: {cause!r}") from exc
    except _GONE as exc:
        detail = (str(exc).strip().splitlines() or ["no detail"])[0]
        raise RunnerUnavailable(
            f"{what} is on Ray node {node_id[:12]}, whose boxvm runner is gone ({type(exc).__name__}: {detail}): "
            "its boxes cannot be reached until a runner runs there again (BoxPool.start_runners); "
            "boxes on other nodes are unaffected"
        ) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the local half of a copy; handles block, so they refuse a thread with a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise InvalidArgument("BoxRef calls block: from async code, call them in a thread (asyncio.to_thread)")


def _names(names: list[str | None] | None, count: int) -> list[str | None]:
    if names is not None and len(names) != count:
        raise InvalidArgument(f"got {len(names)} names for {count} boxes")
    return list(names) if names is not None else [None] * count


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _tar(path: Path) -> bytes:
    return await collect(tree_chunks(path), str(path))


@dataclass(frozen=True)
class BoxRef:
    """A box on some node of the cluster, usable from any Ray task or driver."""

    node_id: str
    id: str
    name: str
    runner: ActorHandle

    def __repr__(self) -> str:
        return f"<BoxRef {self.name} {self.id[:12]} on {self.node_id[:12]}>"

    def _call(self, method: str, *args: Any) -> Any:
        ref = getattr(self.runner, method).remote(self.id, *args)
        return _wait(ref, self.node_id, f"box {self.name!r} ({self.id[:12]})")

    def _ref(self, info: BoxInfo) -> BoxRef:
        return BoxRef(self.node_id, info.id, info.name, self.runner)

    def info(self) -> BoxInfo:
        return self._call("info")

    def start(self) -> BoxInfo:
        """Start (or resume) the box; NoCapacity if its node has no room for it now."""
        return self._call("start")

    def stop(self, timeout: float = 10.0) -> BoxInfo:
        return self._call("stop", timeout)

    def remove(self, force: bool = False) -> None:
        self._call("remove", force)

    def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        kwargs = {"env": env, "cwd": cwd, "user": user, "stdin": stdin, "timeout": timeout}
        return self._call("exec", argv, kwargs)

    def copy_in(self, host_path: str | Path, box_path: str) -> None:
        """Copy a file or tree of the caller's host (whatever node it is) into the box."""
        self._call("put", box_path, _run(_tar(Path(host_path))))

    def copy_out(self, box_path: str, host_path: str | Path) -> None:
        """Copy a box file or tree to the caller's host, as ``Box.copy_out`` does."""
        tar = self._call("get", box_path)
        _run(receive_tree(_once(tar), Path(host_path), box_path))

    def snapshot(self, name: str, options: SnapshotOptions | None = None) -> SnapshotInfo:
        return self._call("snapshot", name, options or SnapshotOptions())

    def snapshots(self) -> list[SnapshotInfo]:
        return self._call("snapshots")

    def clone_many(
        self, count: int, options: CloneOptions | None = None, names: list[str | None] | None = None
    ) -> list[BoxRef]:
        """Copy-on-write clones on the box's own node (BoxPool.clone places them elsewhere when
        that node is full)."""
        if names is not None and len(names) != count:
            raise InvalidArgument(f"got {len(names)} names for {count} clones")
        infos = self._call("clone", list(names) if names else [None] * count, options or CloneOptions())
        return [self._ref(info) for info in infos]

    def export(self, url: str, snapshot: str | None = None) -> str:
        """Write the box (or its snapshot ``snapshot``) as an archive at ``url`` (``s3://``, or a
        path every node can read); never over an existing object."""
        return self._call("export", url, snapshot)


@dataclass(frozen=True)
class Seed:
    """A published archive and the size of the boxes forked from it."""

    url: str
    cpus: int
    memory_mib: int


class BoxPool:
    """The boxes of every node of the Ray cluster this process is connected to.

    ``home`` is each node's boxvm home (``{node_id}`` or ``{node}``, its first 12 characters, are
    replaced, for nodes that share a filesystem); None means ``$BOXVM_HOME`` or ``~/.boxvm`` there. The
    home must be set up (``boxvm setup``) on every node. ``store`` (``s3://bucket/prefix``) lets
    ``clone`` continue on another node when the source's node is full.
    """

    def __init__(
        self,
        home: str | None = None,
        *,
        namespace: str = "boxvm",
        store: str | None = None,
        probe_timeout: float = 10.0,
        start_timeout: float = 120.0,
    ) -> None:
        if not ray.is_initialized():
            raise InvalidArgument("BoxPool needs a Ray connection: call ray.init() first")
        self._home = home
        self._namespace = namespace
        self._store = store.rstrip("/") if store else None
        self._timeout = probe_timeout
        self._start_timeout = start_timeout
        self._id = uuid.uuid4().hex  # what the runners know this pool by (``Runner.attach``)
        self._runners: dict[str, ActorHandle] = {}
        self.lost: dict[str, str] = {}  # node id -> why its runner is out of the pool
        self.start_runners()

    # -- runners ----------------------------------------------------------------------
    def start_runners(self) -> list[str]:
        """A runner on every alive node that has none (one per node even across pools: the
        actor is named after its node). Returns the nodes served."""
        remote = ray.remote(num_cpus=0, max_restarts=0)(Runner)
        started = {}
        for node in ray.nodes():
            node_id = node["NodeID"]
            if not node["Alive"] or node_id in self._runners:
                continue
            resources = node["Resources"]
            self._runners[node_id] = remote.options(
                name=RUNNER_PREFIX + node_id,
                namespace=self._namespace,
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(
                home_for(self._home, node_id),
                node_id,
                float(resources.get("CPU", 0)),
                int(resources.get("memory", 0)) >> 20,
                actor=True,
            )
            self.lost.pop(node_id, None)
            started[node_id] = self._runners[node_id].attach.remote(self._id)
        # Wait for the new ones: a runner still importing boxvm must not count as hung later.
        ready, _ = ray.wait(list(started.values()), num_returns=len(started), timeout=self._start_timeout)
        for node_id, ref in started.items():
            if ref not in ready:
                self._drop(node_id, f"the runner did not start within {self._start_timeout:g} s")
                continue
            try:
                _wait(ref, node_id, "the runner")
            except BoxvmError as exc:  # its home or boxvm failed it
                self._drop(node_id, exc.message)
        return list(self._runners)

    def _drop(self, node_id: str, why: str) -> None:
        self._runners.pop(node_id, None)
        self.lost[node_id] = why

    def _ask_all(
        self, call: Callable[[ActorHandle], ray.ObjectRef], what: str, timeout: float | None, *, probe: bool = False
    ) -> dict[str, Any]:
        """``call`` on every live runner at once; their answers by node. A runner that is gone
        leaves the pool (``lost`` says why; ``start_runners`` takes a live one back). One that
        does not answer within ``timeout`` (hung, not dead: Ray would wait forever) raises
        RunnerUnavailable, or with ``probe`` (a load) leaves the pool too, as one that fails
        does; otherwise a failure raises, once every runner has been heard."""
        refs = {node: call(runner) for node, runner in self._runners.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        answers, failure = {}, None
        for node, ref in refs.items():
            try:
                if ref not in ready:
                    raise RunnerUnavailable(
                        f"the boxvm runner of Ray node {node[:12]} gave no answer within {timeout:g} s"
                    )
                answers[node] = _wait(ref, node, what)
            except BoxvmError as exc:
                if probe or (isinstance(exc, RunnerUnavailable) and ref in ready):
                    self._drop(node, exc.message)
                else:
                    failure = failure or exc
        if failure is not None:
            raise failure
        return answers

    def loads(self) -> list[NodeLoad]:
        """Every live runner's capacity and use; a runner that is gone, fails, or does not
        answer within ``probe_timeout`` leaves the pool (``lost`` says why) and the others
        keep serving."""
        return list(
            self._ask_all(lambda runner: runner.load.remote(), "the runner", self._timeout, probe=True).values()
        )

    # -- boxes ------------------------------------------------------------------------
    def create(self, options: BoxOptions | None = None, name: str | None = None, *, start: bool = True) -> BoxRef:
        """A new box on the node with the most free cpus (then memory) that fits it."""
        return self.create_many(1, options, [name], start=start)[0]

    def create_many(
        self,
        count: int,
        options: BoxOptions | None = None,
        names: list[str | None] | None = None,
        *,
        start: bool = True,
        exclude: Iterable[str] = (),
    ) -> list[BoxRef]:
        """``count`` new boxes spread over the nodes with the most room (not on ``exclude``),
        created and started in parallel; all or none."""
        opts = (options or BoxOptions()).validate()
        size = (opts.cpus, opts.memory_mib) if start else (0, 0)
        return self._spread(
            _names(names, count), size, exclude, "new boxes",
            lambda r, share, token: r.create.remote(opts, share, start, token),
        )  # fmt: skip

    def _spread(
        self,
        names: list[str | None],
        size: tuple[int, int],
        exclude: Iterable[str],
        what: str,
        call: Callable[[ActorHandle, list[str | None], str], ray.ObjectRef],
    ) -> list[BoxRef]:
        """Place ``names`` by ``plan`` and run ``call`` on each chosen node's runner at once
        (each call known to its runner by a token). A node that turns out full or gone
        passes its share on to the others (a runner that died in its call has its next
        runner remove what it made: ``Runner._undo_dead_calls``). Any other failure, no room
        left, or an interrupt removes what the calls made, the ones still running once they
        end (``Runner.discard``), and raises; a call that failed made nothing."""
        if (wanted := {n for n in names if n}) and (taken := wanted & {b.name for b in self.boxes()}):
            raise AlreadyExists(f"the pool already has boxes named {sorted(taken)}: choose other names")
        pending, skip, made = list(names), set(exclude), list[BoxRef]()
        running: dict[str, tuple[str, ActorHandle]] = {}  # token -> node and runner of the calls not answered yet
        try:
            while pending:
                shares = plan([x for x in self.loads() if x.node_id not in skip], size[0], size[1], len(pending))
                calls = {}
                for node, n in shares.items():
                    token = uuid.uuid4().hex
                    running[token] = (node, self._runners[node])
                    calls[token] = (node, pending[:n], call(self._runners[node], pending[:n], token))
                    pending = pending[n:]
                failure: BaseException | None = None
                for token, (node, share, ref) in calls.items():
                    try:
                        infos = _wait(ref, node, what)
                    except (NoCapacity, RunnerUnavailable) as exc:
                        skip.add(node)
                        pending += share
                        if isinstance(exc, RunnerUnavailable):
                            self._drop(node, exc.message)
                    except Exception as exc:
                        failure = failure or exc
                    else:
                        made += [BoxRef(node, i.id, i.name, self._runners[node]) for i in infos]
                    del running[token]
                if failure is not None:
                    raise failure
        except BaseException:
            self._undo(made, running)
            raise
        return made

    def _undo(self, made: list[BoxRef], running: dict[str, tuple[str, ActorHandle]]) -> None:
        """Remove the boxes ``made`` and those the calls ``running`` (token -> node, runner) make
        (through the runners that made them, in the pool or not now).
        Waits for those calls to end (a create may be booting them); an interrupt leaves
        the runners to finish. A failure to remove is warned of: the caller's error stands."""
        waits = [(box.node_id, box.runner.remove.remote(box.id, True)) for box in made]
        waits += [(node, runner.discard.remote(token)) for token, (node, runner) in running.items()]
        for node, ref in waits:
            try:
                _wait(ref, node, "the removal of what an abandoned call made")
            except Exception as exc:  # a dead runner's next one undoes its calls
                log.warning("Ray node %s kept boxes of an abandoned call: %s", node[:12], exc)

    def boxes(self) -> list[BoxRef]:
        """The boxes of every live node."""
        listed = self._ask_all(lambda runner: runner.list.remote(), "the runner", self._timeout)
        return [BoxRef(node, i.id, i.name, self._runners[node]) for node, infos in listed.items() for i in infos]

    def get(self, id_or_name: str) -> BoxRef | None:
        """The box with that id or name; InvalidArgument if a name is on several nodes (made
        by another pool, or while a node was out of this one: names are unique per node)."""
        found = [b for b in self.boxes() if id_or_name in (b.id, b.name)]
        if len(found) > 1:
            where = ", ".join(b.node_id[:12] for b in found)
            raise InvalidArgument(f"boxes named {id_or_name!r} are on several nodes ({where}): use the id")
        return found[0] if found else None

    def publish(self, box: BoxRef, url: str, snapshot: str | None = None) -> Seed:
        """Export the box (or its snapshot) once to object storage, for ``fork`` on any node."""
        info = box.info()
        return Seed(box.export(url, snapshot), info.cpus, info.memory_mib)

    def fork(
        self,
        seed: Seed,
        count: int,
        *,
        names: list[str | None] | None = None,
        start: bool = True,
        exclude: Iterable[str] = (),
    ) -> list[BoxRef]:
        """``count`` boxes from a published archive on the nodes with the most room (not on
        ``exclude``): each node imports the archive once and clones it copy-on-write."""
        size = (seed.cpus, seed.memory_mib) if start else (0, 0)
        return self._spread(
            _names(names, count), size, exclude, f"a fork of {seed.url}",
            lambda r, share, token: r.fork.remote(seed.url, share, start, token),
        )  # fmt: skip

    def retire(self, seed: Seed | str, *, delete_object: bool = True, timeout: float | None = _SLOW) -> list[str]:
        """Garbage-collect a published seed: every node's imported copy of it is removed (the
        boxes forked from it keep working), then, with ``delete_object``, the ``s3://`` archive
        itself, so a later ``fork`` of it fails with NotFound. Returns the nodes that held a
        copy. A node whose runner is lost keeps its copy: retire again once it is back. A
        runner waits for a fork importing the seed there; one that gives no answer within
        ``timeout`` seconds (None: no bound) raises RunnerUnavailable, the object kept."""
        url = seed.url if isinstance(seed, Seed) else seed
        answers = self._ask_all(lambda runner: runner.retire.remote(url), f"the seed of {url}", timeout)
        held = [node for node, had in answers.items() if had]
        if delete_object and objstore.is_url(url):
            _run(objstore.delete(objstore.parse(url)))
        return held

    def clone(
        self, box: BoxRef, count: int = 1, *, from_snapshot: str | None = None, start: bool = True
    ) -> list[BoxRef]:
        """Clones of ``box``: copy-on-write on its node when they fit there, else (with a pool
        ``store``) published once and forked on the nodes with room."""
        options = CloneOptions(from_snapshot=from_snapshot, start_after_clone=start)
        try:
            return box.clone_many(count, options)
        except NoCapacity:
            if self._store is None:
                raise
        url = f"{self._store}/{box.id}-{uuid.uuid4().hex}.boxsnap"
        seed = self.publish(box, url, from_snapshot)
        try:
            return self.fork(seed, count, start=start)
        finally:  # the forks keep their disks; the object and each node's import of it are this call's own
            try:
                self.retire(seed)
            except BoxvmError as exc:  # the forks are made: say what is left rather than lose them
                log.warning("could not retire %s after the clones it made (%s): retire it again", seed.url, exc)

    def shutdown(self, *, remove_boxes: bool = False, timeout: float | None = _SLOW) -> None:
        """Leave every runner of the pool, ending those no other pool uses. Their boxes keep
        running unless ``remove_boxes``, which removes every box of the nodes (boxes are the
        nodes', not a pool's: other pools lose theirs too). A runner that fails to remove
        its boxes, or gives no answer within ``timeout`` seconds (hung: None waits without a
        bound), stays in the pool for ``shutdown`` to be called again; the first such
        failure raises. (A close that answers late still detaches this pool there: the
        runner then serves only other pools, or ends, and this pool's next call to it says
        so; a second close of it is harmless.) The runners of nodes out of the pool (``lost``) are
        left too if they answer within ``probe_timeout``."""
        members = dict(self._runners)
        closing = {node: runner.close.remote(self._id, remove_boxes) for node, runner in members.items()}
        strays = {}
        for node in self.lost:
            with contextlib.suppress(ValueError):  # no runner of that name: it is gone
                runner = ray.get_actor(RUNNER_PREFIX + node, namespace=self._namespace)
                strays[node] = (runner, runner.close.remote(self._id, False))
        ready = set(ray.wait(list(closing.values()), num_returns=len(closing), timeout=timeout)[0] if closing else [])
        if strays:
            ray.wait([ref for _r, ref in strays.values()], num_returns=len(strays), timeout=self._timeout)
        failure: BoxvmError | None = None
        for node, ref in closing.items():
            if ref not in ready:  # hung, or still removing boxes: it stays (a second close is idempotent)
                failure = failure or RunnerUnavailable(
                    f"the boxvm runner of Ray node {node[:12]} gave no answer within {timeout:g} s: it stays in"
                    " the pool; call shutdown again"
                )
                continue
            try:
                ended = _wait(ref, node, "the runner")
            except RunnerUnavailable:
                ended = True
            except Exception as exc:  # a Ray error of its own too: the runner stays in the pool
                failure = failure or (exc if isinstance(exc, BoxvmError) else EngineError(f"closing failed: {exc!r}"))
                continue
            if ended:
                ray.kill(members[node], no_restart=True)
            del self._runners[node]
        for node, (runner, ref) in strays.items():
            with contextlib.suppress(Exception):  # hung or gone: nothing more to do from here
                if ray.wait([ref], timeout=0)[0] and _wait(ref, node, "the runner"):
                    ray.kill(runner, no_restart=True)
        if failure is not None:
            raise failure
