"""Turn a directory tree into an ext4 filesystem image with ``mke2fs -d`` (no root, no mount)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from boxvm.errors import ImageError, StorageError


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def make_ext4(
    root: Path,
    out: Path,
    *,
    label: str,
    size_bytes: int | None = None,
    extra_mib: int = 0,
    fakeroot_state: Path | None = None,
) -> None:
    """Write ``out`` as a sparse ext4 image holding ``root``.

    ``size_bytes`` defaults to the tree's size plus a margin. Lazy inode-table and journal
    initialisation keep the file sparse, so a 4 GiB filesystem costs only what it holds.
    ``fakeroot_state`` replays ownership recorded while an unprivileged user unpacked it.
    """
    if size_bytes is None:
        size_bytes = int(tree_bytes(root) * 1.3) + (extra_mib + 32) * 1024 * 1024
    size_bytes = (size_bytes + 4095) // 4096 * 4096
    with out.open("wb") as f:
        f.truncate(size_bytes)
    cmd = [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", label,
        "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d", str(root), str(out),
    ]  # fmt: skip
    if fakeroot_state is not None:
        cmd = ["fakeroot", "-i", str(fakeroot_state), *cmd]
    elif os.geteuid() != 0:
        cmd[-3:-3] = ["-E", "root_owner=0:0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        msg = proc.stderr.strip()
        if "No space left" in msg:
            raise StorageError(f"no space left while writing {out}: free some disk space")
        raise ImageError(f"mke2fs could not build {out.name}: {msg}")
