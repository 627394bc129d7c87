"""The backend contract: every user-facing operation, once, for local and remote use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path

from boxvm.options import (
    BoxInfo,
    BoxOptions,
    CloneOptions,
    DiskUsage,
    ExportOptions,
    ImageInfo,
    SnapshotInfo,
    SnapshotOptions,
)


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
    @abstractmethod
    async def create(self, options: BoxOptions, name: str | None) -> BoxInfo: ...

    @abstractmethod
    async def get(self, id_or_name: str) -> BoxInfo | None: ...

    @abstractmethod
    async def list(self) -> list[BoxInfo]: ...

    @abstractmethod
    async def remove(self, box_id: str, force: bool) -> None: ...

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
    async def copy_in(self, box_id: str, host_path: Path, box_path: str) -> None: ...

    @abstractmethod
    async def copy_out(self, box_id: str, box_path: str, host_path: Path) -> None: ...

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
    async def export(self, box_id: str, dest: Path, options: ExportOptions) -> Path: ...

    @abstractmethod
    async def import_box(self, path: Path, name: str | None, untrusted: bool) -> BoxInfo: ...

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
