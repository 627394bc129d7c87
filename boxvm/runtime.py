"""The public async API: ``Runtime`` (the box collection), ``Box`` and ``Process``.

Both hold a backend and never ask which one: the same code drives boxes on this host
or, through a remote backend, on a server.
"""

from __future__ import annotations

import asyncio
import signal as _signal
from pathlib import Path
from types import TracebackType

from boxvm import objstore
from boxvm.backends.base import Backend, ProcessChannel
from boxvm.errors import BoxNotFound
from boxvm.options import (
    BoxInfo,
    BoxOptions,
    CloneOptions,
    DiskUsage,
    ExecResult,
    ExportOptions,
    ImageInfo,
    SnapshotInfo,
    SnapshotOptions,
    TemplateInfo,
)
from boxvm.paths import Home
from boxvm.status import BoxStatus


class Process:
    """A process started with :meth:`Box.spawn`.

    ``stdout``/``stderr`` are async iterators of bytes as the process produces them.
    Unread output is held back in the guest (at most a 1 MiB window per process), so
    a process whose output nobody reads blocks, exactly as it would on a pipe.
    """

    def __init__(self, channel: ProcessChannel) -> None:
        self._chan = channel
        self.stdout = channel.stdout
        self.stderr = channel.stderr
        self.exit_code: int | None = None
        self.timed_out = False

    async def write(self, data: bytes) -> None:
        await self._chan.write(data)

    def close_stdin(self) -> None:
        self._chan.close_stdin()

    async def wait(self) -> int:
        result = await self._chan.wait()
        self.exit_code = int(result["exit_code"])  # type: ignore[call-overload]
        self.timed_out = bool(result.get("timed_out"))
        return self.exit_code

    def signal(self, signum: int) -> None:
        self._chan.signal(signum)

    def kill(self) -> None:
        self._chan.signal(_signal.SIGKILL)

    def resize(self, rows: int, cols: int) -> None:
        self._chan.resize(rows, cols)


class SnapshotHandle:
    """``box.snapshot``: the box's snapshots by name."""

    def __init__(self, box: Box) -> None:
        self._box = box

    async def create(self, name: str, options: SnapshotOptions | None = None) -> SnapshotInfo:
        """Capture the box's disk now. A running box keeps running: the capture is
        point-in-time and the guest pauses writes only for the freeze window."""
        return await self._box._backend.snapshot_create(self._box.id, name, options or SnapshotOptions())

    async def list(self) -> list[SnapshotInfo]:
        return await self._box._backend.snapshot_list(self._box.id)

    async def get(self, name: str) -> SnapshotInfo | None:
        return await self._box._backend.snapshot_get(self._box.id, name)

    async def restore(self, name: str) -> BoxInfo:
        """Return the (stopped) box's disk to the snapshot; changes since are dropped."""
        info = await self._box._backend.snapshot_restore(self._box.id, name)
        self._box._last = info
        return info

    async def remove(self, name: str) -> None:
        """The name goes at once; the space returns when nothing else uses the layer."""
        await self._box._backend.snapshot_remove(self._box.id, name)


class Box:
    def __init__(self, backend: Backend, info: BoxInfo) -> None:
        self._backend = backend
        self.id = info.id
        self.name = info.name
        self._last = info
        self.snapshot = SnapshotHandle(self)

    def __repr__(self) -> str:
        return f"<Box {self.name} {self.id[:12]} {self._last.status.value}>"

    async def info(self) -> BoxInfo:
        info = await self._backend.get(self.id)
        if info is None:
            raise BoxNotFound(f"box {self.name!r} was removed")
        self._last = info
        return info

    @property
    def status(self) -> BoxStatus:
        """The status last seen by this handle (``await box.info()`` refreshes it)."""
        return self._last.status

    async def start(self) -> BoxInfo:
        self._last = await self._backend.start(self.id)
        return self._last

    async def stop(self, timeout: float = 10.0) -> BoxInfo:
        self._last = await self._backend.stop(self.id, timeout)
        return self._last

    async def pause(self) -> BoxInfo:
        self._last = await self._backend.pause(self.id)
        return self._last

    async def resume(self) -> BoxInfo:
        self._last = await self._backend.resume(self.id)
        return self._last

    async def suspend(self) -> BoxInfo:
        """Save memory and device state with the box and let its VM exit (status
        ``suspended``); ``start()`` resumes every process where it was."""
        self._last = await self._backend.suspend(self.id)
        return self._last

    async def spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> Process:
        """Start a process; stream its output. Raises InvalidState unless the box runs."""
        chan = await self._backend.spawn(
            self.id, argv, env=env, cwd=cwd, user=user, timeout=timeout, tty=tty, size=size
        )
        return Process(chan)

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a process to completion and collect its output.

        A missing command gives exit code 127 (126 if not executable), like a shell.
        On ``timeout`` the process group is killed and ``timed_out`` is set.
        """
        proc = await self.spawn(argv, env=env, cwd=cwd, user=user, timeout=timeout)

        async def feed() -> None:
            if stdin:
                await proc.write(stdin)
            proc.close_stdin()

        async def collect(stream: object) -> bytes:
            return b"".join([chunk async for chunk in stream])  # type: ignore[attr-defined]

        _fed, out, err = await asyncio.gather(feed(), collect(proc.stdout), collect(proc.stderr))
        code = await proc.wait()
        return ExecResult(code, out, err, proc.timed_out)

    async def copy_in(self, host_path: str | Path, box_path: str) -> None:
        """Copy a host file or tree into the box (into ``box_path`` if it is a directory)."""
        await self._backend.copy_in(self.id, Path(host_path), box_path)

    async def copy_out(self, box_path: str, host_path: str | Path) -> None:
        """Copy a box file or tree to the host (into ``host_path`` if it is a directory)."""
        await self._backend.copy_out(self.id, box_path, Path(host_path))

    async def logs(self) -> str:
        """The guest's console output of the current or last run."""
        return await self._backend.logs(self.id)

    async def export(self, dest: str | Path, options: ExportOptions | None = None) -> Path | str:
        """Write the box (running or not) to a verified ``.boxsnap`` archive at ``dest``
        (a file, or a directory to hold ``<name>.boxsnap``; or an ``s3://bucket/key`` object,
        returned as that URL). A running box pauses only for the capture's freeze window,
        not for the copy. Never leaves a partial file or object, never replaces one."""
        if objstore.is_url(dest):
            return await self._backend.export_object(self.id, str(dest), options or ExportOptions())
        return await self._backend.export(self.id, Path(dest), options or ExportOptions())

    async def migrate(self, target: Runtime, *, via: str | None = None) -> Box:
        """Move this box to ``target``'s runner: its archive streamed straight into the
        target's import, or with ``via`` through objects under it (``s3://bucket/prefix/``
        both reach). Journaled: calling it again after a crash finishes the move
        (``boxvm.migrate``). A running box moves as a suspended one and resumes there.
        Returns the box on the target (with the same id)."""
        from boxvm.migrate import migrate

        return Box(target.backend, await migrate(self._backend, self.name, target.backend, via))

    async def clone(self, name: str | None = None, options: CloneOptions | None = None) -> Box:
        """A copy-on-write fork of the box (running or not) or, with ``from_snapshot``,
        of one of its snapshots. The clone has its own id, name, MAC and machine id."""
        infos = await self._backend.clone(self.id, [name], options or CloneOptions())
        return Box(self._backend, infos[0])

    async def clone_many(
        self, count: int, options: CloneOptions | None = None, names: list[str] | None = None
    ) -> list[Box]:
        """``count`` clones sharing one capture of the source."""
        if names is not None and len(names) != count:
            from boxvm.errors import InvalidArgument

            raise InvalidArgument(f"got {len(names)} names for {count} clones")
        infos = await self._backend.clone(self.id, list(names) if names else [None] * count, options or CloneOptions())
        return [Box(self._backend, info) for info in infos]


class ImageHandle:
    """``Runtime.images``: the image cache shared by every box of the runtime."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def pull(
        self, reference: str, *, username: str | None = None, password: str | None = None, insecure: bool = False
    ) -> ImageInfo:
        """Pull (or find cached) a registry image such as ``alpine:3.20``. Credentials
        default to ``BOXVM_REGISTRY_USERNAME``/``_PASSWORD`` if ``BOXVM_REGISTRY_HOST`` names the
        registry, else its Docker config.json entry (over REST: only the caller's own);
        plain HTTP is used only for loopback registries or with ``insecure=True``."""
        return await self._backend.image_pull(reference, username, password, insecure)

    async def list(self) -> list[ImageInfo]:
        return await self._backend.image_list()

    async def remove(self, reference: str) -> None:
        """Remove a cached image (refused while a box is built on it)."""
        await self._backend.image_remove(reference)


class TemplateHandle:
    """``Runtime.templates``: warm-start templates (``boxvm.templates``) of the host that runs
    the boxes: this one, or a remote runtime's server (``/v1/templates``)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def create(self, options: BoxOptions | None = None) -> TemplateInfo:
        """Make (or remake) the template of the machine ``options`` describe: a cold boot."""
        return await self._backend.template_create(options or BoxOptions())

    async def list(self) -> list[TemplateInfo]:
        return await self._backend.template_list()

    async def remove(self, template_id: str) -> None:
        """Remove one (InvalidArgument for a malformed id, NotFound for an unknown one);
        boxes resumed from it keep running."""
        await self._backend.template_remove(template_id)


class Runtime:
    """The boxes of one home (local) or one server (remote)."""

    def __init__(self, home: str | Path | None = None, *, backend: Backend | None = None) -> None:
        if backend is None:
            from boxvm.backends.local import LocalBackend

            backend = LocalBackend(Home.default(home))
        self._backend = backend
        self.images = ImageHandle(backend)
        self.templates = TemplateHandle(backend)

    @classmethod
    def remote(cls, url: str, token: str | None = None, *, ca_bundle: str | Path | None = None) -> Runtime:
        """The boxes of a ``boxvm serve`` server: the same API, over HTTP(S). ``token`` None
        reads a loopback server's generated token from the home; ``ca_bundle`` (PEM; default
        ``$BOXVM_CA_BUNDLE`` or the system's) verifies an https server."""
        from boxvm.backends.remote import RemoteBackend

        return cls(backend=RemoteBackend(url, token, ca_bundle=ca_bundle))

    @property
    def backend(self) -> Backend:
        return self._backend

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def create(self, options: BoxOptions | None = None, name: str | None = None) -> Box:
        """Create a box (its disk too, so every state operation works before a start)."""
        return Box(self._backend, await self._backend.create(options or BoxOptions(), name))

    async def get(self, id_or_name: str) -> Box | None:
        info = await self._backend.get(id_or_name)
        return Box(self._backend, info) if info else None

    async def list(self) -> list[BoxInfo]:
        return await self._backend.list()

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        """Remove a box and its files. A running box needs ``force=True``."""
        info = await self._backend.get(id_or_name)
        if info is None:
            raise BoxNotFound(f"no box named or with id {id_or_name!r}")
        await self._backend.remove(info.id, force)

    async def import_box(self, archive: str | Path, name: str | None = None, *, untrusted: bool = False) -> Box:
        """Create a (stopped) box from an archive, verified completely before it appears.
        ``archive`` may be an ``s3://bucket/key`` object (streamed, never stored whole).
        ``untrusted`` drops host-specific options (ports) and clamps resources."""
        if objstore.is_url(archive):
            return Box(self._backend, await self._backend.import_object(str(archive), name, untrusted))
        return Box(self._backend, await self._backend.import_box(Path(archive), name, untrusted))

    async def disk_usage(self) -> DiskUsage:
        """Host bytes per box and snapshot: held alone, and shared through common layers."""
        return await self._backend.disk_usage()

    async def close(self) -> None:
        await self._backend.close()
