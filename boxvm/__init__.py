"""boxvm: micro-VM sandboxes for Python, with first-class box state."""

import logging

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
from boxvm.runtime import Box, ImageHandle, Process, Runtime, SnapshotHandle
from boxvm.status import BoxStatus

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
