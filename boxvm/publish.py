"""Write a file the user named so that it appears complete or not at all, never over another.

The file is written unnamed (``O_TMPFILE`` in the destination directory), fsync'd, and given
its name with ``linkat``, which fails if the name exists: a process killed mid-write leaves
nothing at the destination, and a file created there meanwhile is never replaced. Where the
filesystem has no ``O_TMPFILE`` the bytes go to a hidden named file first, recorded in the
home's ``tmp/`` so startup recovery deletes it if the process dies, and are published with a
hard link (also no-replace) before the temporary name is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from boxvm.errors import AlreadyExists, StorageError

JOURNAL_PREFIX = "publish-"  # tmp/publish-<pid>-<n>: the path of a named partial file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _failed(exc: OSError, dest: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on the device of {dest.parent}: {dest.name} was not written")
    return StorageError(f"could not write {dest}: {exc.strerror or exc}")


@contextlib.contextmanager
def exclusive_file(dest: Path, journal_dir: Path | None = None) -> Iterator[IO[bytes]]:
    """Yield a binary file that becomes ``dest`` when the block ends without an exception.

    Raises AlreadyExists if ``dest`` exists at the end (nothing is replaced) and StorageError
    when the disk fails; on any error nothing is left at or next to ``dest``.
    """
    try:
        fd = os.open(dest.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise _failed(exc, dest) from exc
        with _named_partial(dest, journal_dir) as out:
            yield out
        return
    with os.fdopen(fd, "wb") as out:
        yield out
        try:
            out.flush()
            os.fsync(out.fileno())
            parent = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # a dir fd makes CPython call linkat(AT_SYMLINK_FOLLOW) rather than link()
                os.link(f"/proc/self/fd/{out.fileno()}", dest.name, dst_dir_fd=parent, follow_symlinks=True)
                os.fsync(parent)
            finally:
                os.close(parent)
        except FileExistsError:
            raise AlreadyExists(f"{dest} appeared while it was written: it was left alone") from None
        except OSError as exc:
            raise _failed(exc, dest) from exc


@contextlib.contextmanager
def _named_partial(dest: Path, journal_dir: Path | None) -> Iterator[IO[bytes]]:
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    journal = None
    if journal_dir is not None:
        journal = journal_dir / f"{JOURNAL_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        journal.write_text(str(partial))
    try:
        with partial.open("xb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(partial, dest)
        except FileExistsError:
            raise AlreadyExists(f"{dest} appeared while it was written: it was left alone") from None
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise _failed(exc, dest) from exc
    finally:
        partial.unlink(missing_ok=True)
        if journal is not None:
            journal.unlink(missing_ok=True)


def recover(journal_dir: Path, alive: Callable[[int], bool]) -> None:
    """Delete the named partial files of dead processes (``alive(pid) -> bool``)."""
    for entry in journal_dir.glob(f"{JOURNAL_PREFIX}*"):
        pid = entry.name[len(JOURNAL_PREFIX) :].split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            with contextlib.suppress(OSError):
                partial = Path(entry.read_text())
                if partial.name.startswith(".") and ".partial-" in partial.name:
                    partial.unlink(missing_ok=True)
            entry.unlink(missing_ok=True)
