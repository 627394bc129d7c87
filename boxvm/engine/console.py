"""The box's console log: QEMU's serial output, capped on disk and read back as a bounded tail.

The guest writes its serial console as fast as it likes, for as long as it likes. QEMU's
own ``file:`` chardev can only grow, so the supervisor takes QEMU's stdout (the serial
port) through a pipe and keeps at most ``limit`` bytes in ``console.log``, rotating the
older bytes to ``console.log.1``: the disk holds at most twice the limit. Readers take
only the tail, so ``boxvm logs`` is bounded whatever the guest wrote.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

LOG_LIMIT = 4 << 20  # bytes per file; one rotated file is kept
TAIL_LIMIT = 1 << 20  # what `logs` returns at most
READ_SIZE = 64 << 10


def log_limit() -> int:
    """The per-file cap; ``BOXVM_CONSOLE_LOG_BYTES`` lets an operator (or a test) change it."""
    try:
        return max(4096, int(os.environ.get("BOXVM_CONSOLE_LOG_BYTES", LOG_LIMIT)))
    except ValueError:
        return LOG_LIMIT


class RotatingLog:
    """An append-only file that never exceeds ``limit`` bytes; older bytes move to ``<name>.1``."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.old = path.with_name(path.name + ".1")
        self.old.unlink(missing_ok=True)  # a previous run's
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115  lives as long as QEMU
        self.size = 0

    def write(self, data: bytes) -> None:
        while data:
            if self.size >= self.limit:
                self.file.close()
                os.replace(self.path, self.old)
                self.file = open(self.path, "wb", buffering=0)  # noqa: SIM115
                self.size = 0
            part = data[: self.limit - self.size]
            self.file.write(part)
            self.size += len(part)
            data = data[len(part) :]

    def close(self) -> None:
        self.file.close()


async def pump(stream: asyncio.StreamReader, log: RotatingLog) -> None:
    """Copy a QEMU output pipe into ``log`` until QEMU closes it."""
    try:
        while data := await stream.read(READ_SIZE):
            log.write(data)
    finally:
        log.close()


def tail(path: Path, limit: int = TAIL_LIMIT) -> str:
    """The last ``limit`` bytes of the log (its rotated part included), decoded leniently."""
    chunks: list[bytes] = []
    want = limit
    for part in (path, path.with_name(path.name + ".1")):
        if want <= 0:
            break
        try:
            with open(part, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - want))
                data = f.read(want)
        except FileNotFoundError:
            continue
        chunks.append(data)
        want -= len(data)
    return b"".join(reversed(chunks)).decode(errors="replace")
