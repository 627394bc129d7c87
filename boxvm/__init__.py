"""boxvm: micro-VM sandboxes for Python, with first-class box state."""

import logging
from typing import TYPE_CHECKING

from boxvm.errors import (
    AlreadyExists,
    ArchiveError,
    BoxNotFound,
    BoxvmError,
    EngineError,
    ImageError,
    InvalidArgument,
    InvalidState,
    NotFound,
    QuiesceError,
    SnapshotNotFound,
    StorageError,
    Unauthorized,
    Unsupported,
)
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
)
from boxvm.status import BoxStatus

if TYPE_CHECKING:
    from boxvm.runtime import Box, ImageHandle, Process, Runtime, SnapshotHandle

_RUNTIME = frozenset({"Box", "ImageHandle", "Process", "Runtime", "SnapshotHandle"})


def __getattr__(name: str) -> object:
    """The runtime (and every backend with it) loads on first use: a box's supervisor,
    which needs only the engine, then starts without it (~0.15 s of imports here)."""
    if name in _RUNTIME:
        from boxvm import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'boxvm' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "AlreadyExists",
    "ArchiveError",
    "Box",
    "BoxInfo",
    "BoxNotFound",
    "BoxOptions",
    "BoxStatus",
    "BoxvmError",
    "CloneOptions",
    "DiskUsage",
    "EngineError",
    "ExecResult",
    "ExportOptions",
    "ImageError",
    "ImageHandle",
    "ImageInfo",
    "InvalidArgument",
    "InvalidState",
    "NotFound",
    "Process",
    "QuiesceError",
    "Runtime",
    "SnapshotHandle",
    "SnapshotInfo",
    "SnapshotNotFound",
    "SnapshotOptions",
    "StorageError",
    "Unauthorized",
    "Unsupported",
]

logging.getLogger("boxvm").addHandler(logging.NullHandler())
