"""A directory tree as an initramfs (uncompressed newc cpio)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def write_cpio(root: Path, out: BinaryIO) -> None:
    """Write ``root`` as an uncompressed newc cpio archive, all files owned by root.

    Hand-written because the format is 30 lines and the ``cpio`` tool would record the
    building user's ownership; uncompressed because unpacking gzip costs seconds under TCG.
    """
    ino = 1

    def entry(name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        nonlocal ino
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))
        ino += 1

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            entry(rel, 0o040755, nlink=2)
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            name = os.path.normpath(os.path.join(rel, fname))
            entry(name, 0o100000 | (path.stat().st_mode & 0o7777), path.read_bytes())
    entry("TRAILER!!!", 0)
