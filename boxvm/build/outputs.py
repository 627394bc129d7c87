"""Build outputs are directories named by a hash of their inputs (content-addressed)."""

from __future__ import annotations

from pathlib import Path


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
