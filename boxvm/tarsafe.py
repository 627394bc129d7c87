"""Reading untrusted tar streams with bounded memory and time.

The stdlib ``tarfile`` parses headers well but reads a GNU long name or a pax header
whole, whatever size its header claims (a 32 KiB archive made it allocate 2 GiB),
walks sparse maps of any length, keeps every member it has read, and skips unread data
with a loop as long as the member's claimed size. We keep ``tarfile`` for the parsing
and bound it through its documented extension point (a ``TarInfo`` subclass overriding
``_proc_member``): extended headers are size-checked before they are read, chains of
them are capped, sparse members and unknown types are refused. ``members()`` forgets members once
read and drains each member's data itself, so a lying size ends at the end of input.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

MAX_LONG_NAME = 64 << 10  # a GNU long name/link: far beyond any real path
MAX_PAX_HEADER = 1 << 20  # one pax extended header (xattrs, long names)
MAX_GLOBAL_HEADERS = 1 << 20  # all pax global headers of a stream together
MAX_EXTENDED_CHAIN = 8  # extended headers in a row before one real member
_DRAIN = 1 << 20

_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, *_LONG)


class UnsafeTar(tarfile.TarError):
    """A header beyond our limits or a feature we refuse (sparse files). Not a
    ``HeaderError``, so ``tarfile`` does not mistake it for the end of the archive."""


class BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeTar(f"{self.name!r} is a sparse file: sparse members are refused")
        if self.type not in _EXTENDED:
            if self.type not in tarfile.SUPPORTED_TYPES:  # tarfile would skip its claimed size by seeking
                raise UnsafeTar(f"{self.name!r} has the unknown tar type {self.type!r}")
            return super()._proc_member(tar)  # type: ignore[misc, no-any-return]
        limit = MAX_LONG_NAME if self.type in _LONG else MAX_PAX_HEADER
        if self.size > limit:
            raise UnsafeTar(f"an extended tar header of {self.size} bytes is over the limit of {limit}")
        state: dict[str, int] = tar.__dict__.setdefault("_boxvm_limits", {"chain": 0, "global": 0})
        if self.type == tarfile.XGLTYPE:
            state["global"] += self.size
            if state["global"] > MAX_GLOBAL_HEADERS:
                raise UnsafeTar(f"pax global headers exceed {MAX_GLOBAL_HEADERS} bytes")
        state["chain"] += 1
        if state["chain"] > MAX_EXTENDED_CHAIN:
            raise UnsafeTar(f"more than {MAX_EXTENDED_CHAIN} extended tar headers in a row")
        try:
            return super()._proc_member(tar)  # type: ignore[misc, no-any-return]
        finally:
            state["chain"] -= 1

    # pax headers can declare a sparse map too; tarfile would read a 1.0 map from the data
    # blocks without any bound. These are the hooks _proc_pax calls for them.
    def _proc_gnusparse_00(self, *_args: Any) -> None:
        raise UnsafeTar("sparse members are refused")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def open_stream(fileobj: IO[bytes] | Any) -> tarfile.TarFile:
    """An uncompressed tar read front to back from ``fileobj`` (no seeking)."""
    return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=BoundedTarInfo)  # type: ignore[call-overload, no-any-return]


def open_file(path: Path) -> tarfile.TarFile:
    """A tar file on disk, plain or compressed (gzip, bzip2, xz)."""
    return tarfile.open(path, mode="r:*", tarinfo=BoundedTarInfo)


def members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    """Each member of ``tar`` with a reader of its data (None unless a regular file).
    Whatever data the caller leaves unread is drained before the next header, so a member
    claiming more bytes than the stream holds ends at end of input (``tarfile.ReadError``)
    instead of being skipped block by block."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # tarfile keeps every member for random access we never use
        data = tar.extractfile(member) if member.isreg() else None
        yield member, data
        if data is not None:
            while data.read(_DRAIN):
                pass
