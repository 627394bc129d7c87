"""File locks (``flock``) that a coroutine waits for without holding a thread."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path


async def acquire(path: Path, mode: int = fcntl.LOCK_EX, *, every: float = 0.02, follow: bool = True) -> int:
    """An open descriptor of ``path`` (made if missing) holding its ``flock`` in ``mode``;
    closing it releases the lock, as does the holder's death. Polled, not a blocking flock in
    a thread: a thread would be held while waiting (a few waiters starve the event loop's
    pool), and a cancelled caller's thread would still take the lock later and keep it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                await asyncio.sleep(every)
    except BaseException:
        os.close(fd)
        raise
