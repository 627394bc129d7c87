"""Build outputs are directories named by a hash of their inputs (content-addressed)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def building(dest: Path) -> Iterator[None]:
    """Held while ``dest`` is built: one build of an output at a time, across processes (an
    flock on ``.<name>.lock`` beside it); the caller looks again under it for a build made
    meanwhile. Concurrent first uses each built before: minutes of mmdebstrap and GBs in
    ``tmp/`` apiece, and for an image's base disk, which no build reproduces byte for byte,
    another file system under the boxes of the first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases it


def publish(work: Path, dest: Path, marker: str) -> None:
    """Give the finished build ``work`` its name ``dest``, whose file ``marker`` is written last.

    Two processes may build the same id at once: the second rename fails on the first's
    non-empty directory, and that complete build (it has ``marker``) is the result for both.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        work.rename(dest)
    except OSError:
        if not (dest / marker).is_file():  # not a concurrent builder's success
            raise
