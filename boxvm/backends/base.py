"""The backend contract: every user-facing operation, once, for local and remote use.

Archives and file trees cross it as byte streams (``ByteStream``: exhaust it or
``aclose`` it), so a server can relay them without files or unbounded memory. Their
host-file forms (export to a path, import from one, copy a host tree in or out) are the
concrete methods here, written once for every backend on top of those streams: an export
lands through ``boxvm.publish`` (unnamed until complete and fsync'd, never over another
file, nothing left on failure) whether its bytes come from this host's disk or a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from boxvm import archive, faults, objstore, publish
from boxvm.errors import BoxNotFound, EngineError, NotFound, Unsupported
from boxvm.options import (
    BoxInfo,
    BoxOptions,
    CloneOptions,
    DiskUsage,
    ExportOptions,
    ImageInfo,
    SnapshotInfo,
    SnapshotOptions,
    TemplateInfo,
    check_presented_holder,
)
from boxvm.streams import ByteStream, FileSource
from boxvm.tarstream import receive_tree, tree_chunks

_READ = 4 << 20  # bytes per read of an archive file being imported


class ProcessChannel(ABC):
    """One running process in a box, as a backend delivers it."""

    stdout: AsyncIterator[bytes]
    stderr: AsyncIterator[bytes]

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    def close_stdin(self) -> None: ...

    @abstractmethod
    def signal(self, signum: int) -> None: ...

    @abstractmethod
    def resize(self, rows: int, cols: int) -> None: ...

    @abstractmethod
    async def wait(self) -> dict[str, object]:
        """The final result: ``{"exit_code": int, "timed_out": bool}``."""


class Backend(ABC):
    journal_dir: Path | None = None  # where this host's recovery looks for named partial files (a local home's tmp/)

    # Warm-start templates (``boxvm.templates``): kept by the host that runs the boxes.
    async def template_create(self, options: BoxOptions) -> TemplateInfo:
        raise Unsupported("templates are made on the host that runs the boxes: run `boxvm setup` there")

    async def template_list(self) -> list[TemplateInfo]:
        raise Unsupported("templates are listed on the host that runs the boxes (`boxvm template ls`)")

    async def template_remove(self, template_id: str) -> None:
        raise Unsupported("templates are removed on the host that runs the boxes (`boxvm template rm`)")

    @abstractmethod
    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo: ...

    @abstractmethod
    async def get(self, id_or_name: str) -> BoxInfo | None: ...

    @abstractmethod
    async def list(self) -> list[BoxInfo]: ...

    @abstractmethod
    async def remove(self, box_id: str, force: bool, holder: str | None = None) -> None:
        """Remove the box; ``holder``: the migration removing it, if one holds it (``lease``)."""

    @abstractmethod
    async def start(self, box_id: str) -> BoxInfo: ...

    @abstractmethod
    async def stop(self, box_id: str, timeout: float) -> BoxInfo: ...

    @abstractmethod
    async def pause(self, box_id: str) -> BoxInfo: ...

    @abstractmethod
    async def resume(self, box_id: str) -> BoxInfo: ...

    @abstractmethod
    async def suspend(self, box_id: str) -> BoxInfo:
        """Save memory and device state with the box and let its VM exit; start() resumes it."""

    @abstractmethod
    async def spawn(
        self,
        box_id: str,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        timeout: float | None,
        tty: bool,
        size: tuple[int, int] | None,
    ) -> ProcessChannel: ...

    @abstractmethod
    async def put_files(self, box_id: str, box_path: str, tar: AsyncIterator[bytes]) -> None:
        """Unpack the tar stream ``tar`` at ``box_path`` in the running box."""

    @abstractmethod
    async def get_files(self, box_id: str, box_path: str) -> ByteStream:
        """``box_path`` in the running box as a tar stream; a missing path raises here."""

    async def copy_in(self, box_id: str, host_path: Path, box_path: str) -> None:
        """Copy a host file or tree into the box (into ``box_path`` if it is a directory)."""
        if not os.path.lexists(host_path):
            raise NotFound(f"{host_path} does not exist on the host")
        await self.put_files(box_id, box_path, _tree(host_path))

    async def copy_out(self, box_id: str, box_path: str, host_path: Path) -> None:
        """Copy a box file or tree to the host as ``docker cp`` does (``boxvm.tarstream``)."""
        stream = await self.get_files(box_id, box_path)
        async with contextlib.aclosing(stream):
            try:
                await receive_tree(stream, host_path, box_path)
            except tarfile.TarError as exc:
                raise EngineError(f"the box sent an unreadable tar stream for {box_path}: {exc}") from exc

    @abstractmethod
    async def logs(self, box_id: str) -> str: ...

    @abstractmethod
    async def snapshot_create(self, box_id: str, name: str, options: SnapshotOptions) -> SnapshotInfo: ...

    @abstractmethod
    async def snapshot_list(self, box_id: str) -> list[SnapshotInfo]: ...

    @abstractmethod
    async def snapshot_get(self, box_id: str, name: str) -> SnapshotInfo | None: ...

    @abstractmethod
    async def snapshot_restore(self, box_id: str, name: str) -> BoxInfo: ...

    @abstractmethod
    async def snapshot_remove(self, box_id: str, name: str) -> None: ...

    @abstractmethod
    async def clone(self, box_id: str, names: list[str | None], options: CloneOptions) -> list[BoxInfo]: ...

    @abstractmethod
    async def export_stream(self, box_id: str, options: ExportOptions, holder: str | None = None) -> ByteStream:
        """The box as a ``.boxsnap`` byte stream, produced while it is read. A failure before
        the first byte raises here; a later one is raised by the stream, after its bytes.
        ``holder``: the migration exporting it, if one holds it (``lease``)."""

    @abstractmethod
    async def import_stream(
        self,
        archive: Callable[[], AsyncIterator[bytes]],
        name: str | None,
        untrusted: bool,
        label: str,
        box_id: str | None = None,
        nonce: str | None = None,
    ) -> BoxInfo:
        """Create a box from the archive ``archive()`` yields, verified completely before the
        box exists. ``archive`` may be called again when a remote backend retries the upload;
        ``label`` names the archive in errors. ``box_id``: the id the box keeps (a migration
        names this box by it on the target: ``boxvm.migrate``); AlreadyExists if it is taken.
        ``nonce``: the migration's mark, kept in the box's record (``BoxInfo.migration``)."""

    async def lease(self, box_id: str, holder: str) -> None:
        """Hold the box for the migration ``holder`` (``options.check_lease_holder``), a
        compare-and-set on its record: InvalidState if another migration holds it, or if
        it is free and exporting (maybe for a driver that takes no lease). While held, the
        box is used as before, but exported and removed only by that move
        (``status.require_holder``)."""
        raise Unsupported("this runner cannot hold a box for a migration: upgrade it")

    async def release_lease(self, box_id: str, holder: str | None) -> None:
        """Release the box from the migration ``holder`` (InvalidState if another holds it),
        or with None from whichever holds it (a move known to be given up on)."""
        raise Unsupported("this runner cannot hold a box for a migration: upgrade it")

    async def receives_migrations(self) -> bool:
        """Whether this runner imports a box under its id with a migration's nonce."""
        return True

    async def export(self, box_id: str, dest: Path, options: ExportOptions) -> Path:
        """Write the box's archive to ``dest`` (a file, or a directory to hold ``<name>.boxsnap``)."""
        options.validate()
        info = await self.get(box_id)
        if info is None:
            raise BoxNotFound(f"no box named or with id {box_id!r}: `boxvm ls` lists them")
        dest = archive.destination(dest, info.name)
        stream = await self.export_stream(info.id, options)
        async with contextlib.aclosing(stream):
            try:
                with publish.exclusive_file(dest, self.journal_dir) as out:
                    async for chunk in stream:
                        await asyncio.to_thread(out.write, chunk)
                    faults.point("export:written")
            except OSError as exc:
                raise archive.write_failed(exc, dest) from exc
        return dest

    async def export_object(self, box_id: str, url: str, options: ExportOptions, holder: str | None = None) -> str:
        """Upload the box's archive to object storage (``s3://bucket/key``, create-only); see
        ``boxvm.objstore``. A remote backend has its server do it (``RemoteBackend``)."""
        options.validate()
        check_presented_holder(holder)  # before any request to the store
        target = objstore.parse(url)
        info = await self.get(box_id)
        if info is None:
            raise BoxNotFound(f"no box named or with id {box_id!r}: `boxvm ls` lists them")
        await objstore.refuse_existing(target)
        stream = await self.export_stream(info.id, options, holder)
        async with contextlib.aclosing(stream):
            await objstore.upload(stream, target, self.journal_dir)
        return str(target)

    async def import_object(
        self, url: str, name: str | None, untrusted: bool, box_id: str | None = None, nonce: str | None = None
    ) -> BoxInfo:
        """Create a box from the archive object at ``s3://bucket/key``, streamed into the verifier."""
        source = objstore.parse(url)
        await objstore.size(source)  # NotFound before any box work starts
        download = functools.partial(objstore.download, source)
        return await self.import_stream(download, name, untrusted, str(source), box_id, nonce)

    async def import_box(self, path: Path, name: str | None, untrusted: bool) -> BoxInfo:
        """Create a box from the archive at ``path``."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise NotFound(f"archive {path} does not exist")
        return await self.import_stream(lambda: _file_chunks(path), name, untrusted, path.name)

    @abstractmethod
    async def disk_usage(self) -> DiskUsage: ...

    @abstractmethod
    async def image_pull(
        self, reference: str, username: str | None, password: str | None, insecure: bool
    ) -> ImageInfo: ...

    @abstractmethod
    async def image_list(self) -> list[ImageInfo]: ...

    @abstractmethod
    async def image_remove(self, reference: str) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...


async def _tree(host_path: Path) -> AsyncIterator[bytes]:
    """The tar stream of ``host_path``, started only when read: a backend that refuses before
    reading (a stopped box) leaves no tar thread waiting on a reader."""
    async for chunk in tree_chunks(host_path):
        yield chunk


def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    return FileSource(path, _READ)  # a local import reads it from its worker thread directly
