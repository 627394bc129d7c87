"""boxvm: micro-VM sandboxes for Python, with first-class box state."""

import logging

from boxvm.errors import (
    AlreadyExists,
    ArchiveError,
    BoxvmError,
    EngineError,
    ImageError,
    InvalidArgument,
    InvalidState,
    NotFound,
    QuiesceError,
    StorageError,
    Unauthorized,
)
from boxvm.options import BoxInfo, BoxOptions, ExecResult
from boxvm.runtime import Box, Process, Runtime
from boxvm.status import BoxStatus

__version__ = "0.1.0"
__all__ = [
    "AlreadyExists",
    "ArchiveError",
    "Box",
    "BoxInfo",
    "BoxOptions",
    "BoxStatus",
    "BoxvmError",
    "EngineError",
    "ExecResult",
    "ImageError",
    "InvalidArgument",
    "InvalidState",
    "NotFound",
    "Process",
    "QuiesceError",
    "Runtime",
    "StorageError",
    "Unauthorized",
]

logging.getLogger("boxvm").addHandler(logging.NullHandler())
