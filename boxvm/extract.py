"""Writing untrusted tar members under a directory, contained by file descriptors.

Containment is left to the kernel, never judged from a path string: each member's parent
is reached from the destination's directory fd one component at a time with
``O_NOFOLLOW``, and every entry is created relative to that parent's fd (``O_EXCL``
files, ``symlinkat``, ``linkat`` without following). A symlink, whether the archive
made it or it was there before, is data: nothing is ever written or walked through it,
whatever the path's length (``realpath()`` gives up past PATH_MAX: CVE-2025-4517).
An existing entry is unlinked before a member takes its name, so a hard link cannot be
written through either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from boxvm.errors import ArchiveError, BoxvmError, ImageError, StorageError
from boxvm.tarsafe import members

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NODES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}

Parts = tuple[str, ...]
_Attrs = tuple[int, int, int, float]  # mode, uid, gid, mtime


def _attrs(member: tarfile.TarInfo) -> _Attrs:
    return member.mode, member.uid, member.gid, member.mtime


@dataclass(frozen=True)
class Policy:
    error: type[BoxvmError]  # what a refused or unreadable member raises
    root: str  # what the destination is called in errors
    mode_mask: int = 0o775  # no setuid/setgid/sticky/world-writable bits
    owners: bool = False  # keep recorded uid/gid (else: the caller owns what it extracts)
    devices: bool = False  # device nodes and fifos
    links: bool = True  # symlinks and hard links
    replace_dirs: bool = False  # a non-directory member may replace an existing directory
    foreign_links: bool = False  # hard links to files the archive did not write (a lower layer's)
    retouch_dirs: bool = False  # a directory member sets the attributes of one that already exists
    max_members: int = 1 << 20  # entries of one stream (each costs a walk of its parents)
    max_depth: int = 256  # components of one name
    max_dir_names: int = 64 << 20  # bytes of the directory names kept to set their attributes last


COPY_OUT = Policy(ArchiveError, "the destination")  # a tree sent by a guest: files become the caller's, plain modes
LAYOUT = Policy(ImageError, "the image root", links=False)  # an OCI layout archive: only directories and blobs
# image layers, unpacked as root or under fakeroot: everything as recorded
LAYER = Policy(ImageError, "the image root", mode_mask=0o7777, owners=True, devices=True, replace_dirs=True,
               foreign_links=True, retouch_dirs=True)  # fmt: skip


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def split_name(name: str, policy: Policy) -> Parts:
    """A member name as path components; absolute names, ``..`` and NULs are refused."""
    if name.startswith("/") or "\0" in name:
        raise policy.error(f"tar member {name!r} escapes {policy.root} (absolute or invalid name)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise policy.error(f"tar member {name!r} escapes {policy.root} (a '..' component)")
    if len(parts) > policy.max_depth:
        raise policy.error(f"tar member {name[:200]!r}... is nested over {policy.max_depth} directories deep")
    return parts


class Extractor:
    """Members written under the directory ``root`` (an open fd the caller keeps)."""

    def __init__(self, root: int, policy: Policy) -> None:
        self.root = root
        self.policy = policy
        # Directories whose attributes are set last (the last member wins), by their names
        # joined: a tuple of a deep name's parts cost ~80 KB, and a stream has many members.
        self._dirs: dict[str, _Attrs] = {}
        self._dir_names = 0  # bytes of those names (bounded by the policy)
        self._written: set[tuple[int, int]] = set()  # (device, inode) of the files this extractor wrote

    def _fail(self, parts: Parts, why: str) -> BoxvmError:
        return self.policy.error(f"tar member {'/'.join(parts)!r} {why}")

    @contextlib.contextmanager
    def directory(self, parts: Parts, create: bool = True) -> Iterator[int]:
        """An fd of the directory ``parts`` under the root, reached without following
        any symlink; missing directories are made when ``create`` (else FileNotFoundError)."""
        fd = os.open(".", _DIR, dir_fd=self.root)
        try:
            for i, part in enumerate(parts):
                try:
                    try:
                        nxt = os.open(part, _DIR, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        os.mkdir(part, 0o755, dir_fd=fd)
                        nxt = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    raise  # only when not creating: callers decide what a missing path means
                except OSError as exc:
                    if exc.errno == errno.ENOTDIR and _is_link(fd, part):  # how O_DIRECTORY reports a symlink
                        raise self._fail(parts[: i + 1], "would write through a symlink: refused") from exc
                    raise self._os_error(parts[: i + 1], exc) from exc
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def _os_error(self, parts: Parts, exc: OSError) -> BoxvmError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError("no space left on the host while extracting: free some disk space")
        if exc.errno == errno.ELOOP:
            return self._fail(parts, "would write through a symlink: refused")
        if exc.errno == errno.ENOTDIR:
            return self._fail(parts, "is a file but is used as a directory")
        return self._fail(parts, f"cannot be written: {exc.strerror}")

    def add(self, member: tarfile.TarInfo, data: IO[bytes] | None, parts: Parts, link: Parts = ()) -> None:
        """Write one member at ``parts`` (a hard link's target is ``link``)."""
        if not parts:
            return  # the destination itself: its attributes are not the archive's to set
        kind = member.type
        if (member.issym() or member.islnk()) and not self.policy.links:
            raise self._fail(parts, "is a link: refused here")
        if kind in _NODES and not self.policy.devices:
            raise self._fail(parts, "is a device or special file: refused")
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk() or kind in _NODES):
            raise self._fail(parts, f"has an unsupported tar type {kind!r}")
        with self.directory(parts[:-1]) as parent:
            base = parts[-1]
            try:
                if member.isdir():
                    self._mkdir(parent, base, parts, member)
                elif member.islnk():
                    self._hardlink(parent, base, parts, link)
                else:
                    self._clear(parent, base, parts)
                    if member.isreg():
                        self._write(parent, base, member, data)
                    elif member.issym():
                        os.symlink(member.linkname, base, dir_fd=parent)
                        self._set_by_name(parent, base, member, chmod=False)
                    else:
                        mode = (member.mode & self.policy.mode_mask) | _NODES[kind]
                        os.mknod(base, mode, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
                        self._set_by_name(parent, base, member, chmod=True)
            except OSError as exc:
                raise self._os_error(parts, exc) from exc
            except ValueError as exc:  # a NUL in a link name, a device number out of range
                raise self._fail(parts, f"is malformed: {exc}") from exc

    def _clear(self, parent: int, base: str, parts: Parts) -> None:
        """Make room for a non-directory: unlink what is there (never following it)."""
        try:
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(base, dir_fd=parent)
        elif self.policy.replace_dirs:
            shutil.rmtree(base, dir_fd=parent)  # the fd-based variant: it never follows symlinks
        else:
            raise self._fail(parts, "would replace a directory: refused")

    def _mkdir(self, parent: int, base: str, parts: Parts, member: tarfile.TarInfo) -> None:
        try:
            if stat.S_ISDIR(os.stat(base, dir_fd=parent, follow_symlinks=False).st_mode):
                if self.policy.retouch_dirs or "/".join(parts) in self._dirs:  # else: not ours to change
                    self._remember(parts, member)
                return
            os.unlink(base, dir_fd=parent)
        except FileNotFoundError:
            pass
        os.mkdir(base, 0o700, dir_fd=parent)  # its recorded mode is set last, once its children are in
        self._remember(parts, member)

    def _remember(self, parts: Parts, member: tarfile.TarInfo) -> None:
        """Keep a directory's attributes to set once its children are in, within the
        policy's budget of names."""
        name = "/".join(parts)
        if name not in self._dirs:
            self._dir_names += len(name) + 100  # (the string's and the entry's own overhead)
            if self._dir_names > self.policy.max_dir_names:
                limit = self.policy.max_dir_names >> 20
                raise self.policy.error(f"the archive names over {limit} MiB of directories: refused")
        self._dirs[name] = _attrs(member)

    def _write(self, parent: int, base: str, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        fd = os.open(base, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            with open(fd, "wb", closefd=False) as out:
                if data is not None:
                    shutil.copyfileobj(data, out, 1 << 20)
            self._set_fd(fd, _attrs(member))
            if not self.policy.foreign_links:
                st = os.fstat(fd)
                self._written.add((st.st_dev, st.st_ino))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(base, dir_fd=parent)  # nothing half-written stays behind
            raise
        finally:
            os.close(fd)

    def _hardlink(self, parent: int, base: str, parts: Parts, link: Parts) -> None:
        if not link or link == parts:
            raise self._fail(parts, "is a hard link to itself or to the destination")
        try:
            with self.directory(link[:-1], create=False) as source:
                st = os.stat(link[-1], dir_fd=source, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise self._fail(parts, f"is a hard link to {'/'.join(link)!r}, which is not a regular file")
                if not self.policy.foreign_links and (st.st_dev, st.st_ino) not in self._written:
                    raise self._fail(parts, f"is a hard link to {'/'.join(link)!r}, which this archive did not write")
                self._clear(parent, base, parts)
                os.link(link[-1], base, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise self._fail(parts, f"is a hard link to {'/'.join(link)!r}, which is not in the tree") from exc

    def _set_fd(self, fd: int, attrs: _Attrs) -> None:
        mode, uid, gid, mtime = attrs
        if self.policy.owners:
            with contextlib.suppress(PermissionError):  # unprivileged and not under fakeroot
                os.fchown(fd, uid, gid)
        os.fchmod(fd, mode & self.policy.mode_mask)  # after chown, which clears setuid
        with contextlib.suppress(OverflowError, ValueError, OSError):
            os.utime(fd, (mtime, mtime))

    def _set_by_name(self, parent: int, base: str, member: tarfile.TarInfo, chmod: bool) -> None:
        """Attributes of an entry just created at ``base`` that cannot be opened (a
        symlink, a device node). Owner and times never follow a link."""
        if self.policy.owners:
            with contextlib.suppress(PermissionError):
                os.chown(base, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if chmod:  # only for nodes this call just made with mknodat: not a symlink
            os.chmod(base, member.mode & self.policy.mode_mask, dir_fd=parent)
        with contextlib.suppress(OverflowError, ValueError, OSError):
            os.utime(base, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)

    def finish(self) -> None:
        """Directory attributes, deepest first, once nothing more is written into them;
        a directory removed or replaced since is skipped."""
        for name, attrs in sorted(self._dirs.items(), key=lambda item: item[0].count("/"), reverse=True):
            try:
                with self.directory(tuple(name.split("/")), create=False) as fd:
                    self._set_fd(fd, attrs)
            except (BoxvmError, OSError):
                continue
        self._dirs.clear()

    def remove(self, parts: Parts) -> None:
        """Delete ``parts`` (a whole tree if a directory) without following any symlink."""
        try:
            with self.directory(parts[:-1], create=False) as parent:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(parts[-1], dir_fd=parent)
                else:
                    os.unlink(parts[-1], dir_fd=parent)
        except FileNotFoundError:
            return

    def exists(self, name: str) -> bool:
        """Whether ``name`` is an entry of the root (not followed)."""
        try:
            os.stat(name, dir_fd=self.root, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True


def extract(
    tar: tarfile.TarFile, root: int, policy: Policy, top: str | None = None, then: Callable[[], None] | None = None
) -> None:
    """Extract every member of ``tar`` under the directory fd ``root``. ``top`` renames
    the first component of every name (``docker cp`` copying to a new name). If a member
    is refused, or ``then`` (a check of what follows the archive) fails, top-level entries
    this call created are removed again."""
    ex = Extractor(root, policy)
    seen: set[str] = set()
    created: list[str] = []

    def place(name: str) -> Parts:
        parts = split_name(name, policy)
        if top is not None and parts:
            parts = (top, *parts[1:])
        if parts and parts[0] not in seen:
            seen.add(parts[0])
            if not ex.exists(parts[0]):
                created.append(parts[0])
        return parts

    try:
        for count, (member, data) in enumerate(members(tar), 1):
            if count > policy.max_members:
                raise policy.error(f"the archive has over {policy.max_members} entries: refused")
            parts = place(member.name)
            ex.add(member, data, parts, place(member.linkname) if member.islnk() else ())
        ex.finish()
        if then is not None:
            then()
    except BaseException:
        for name in created:
            with contextlib.suppress(BoxvmError, OSError):
                ex.remove((name,))
        raise
