"""Landlock: a box's QEMU reaches its own files and nothing else of the host's.

seccomp (``qemu.SANDBOX``) stops a QEMU taken over through a device model (by its guest, or
by a device state it loads: every imported memory state is one) from running programs, but
not from opening files: as the user that runs boxvm it could read that user's credentials,
the home's database and token, and every other box's disks and RAM. Landlock, which needs no
privilege, limits which paths a process and its children may open. A box's QEMU keeps:

- in its box directory: making sockets (its QMP and agent sockets); reading and writing the
  files it opens at start (its two tops, its RAM file) and those in ``live/`` (the later tops
  of captures, a scratch file for saved device state), each named by the caller; nothing
  else there: not its logs, records, ``vm.json`` or memory snapshots, and no link, symlink,
  new file or removal that boxvm, unconfined, could follow or trust;
- read-only, each file its caller names (its kernel, initramfs and disks' backing chains):
  files, not their directories, so no other box's layer is in reach;
- read-only, the system's programs and data (``/usr`` and the like, and QEMU's own ``qemu``
  directories beside its ``bin``, never its prefix), ``/sys``, a few files of its own
  ``/proc/<pid>`` (``OWN_PROC``: not ``net/``) and of ``/proc``, the few ``/etc`` files a C
  program reads and the directory ``resolv.conf`` lives in;
- ``/dev/null``, ``/dev/zero``, ``/dev/urandom``, ``/dev/random`` and ``/dev/kvm``.

Where the kernel has Landlock ABI 6, signals to processes outside the domain, and connections
to abstract unix sockets made outside it, are refused too: a QEMU cannot kill its supervisor
or another box's QEMU. Network access is not limited: user-mode networking connects wherever
its guest does. Nor, on any ABI so far, is connecting to a named unix socket: boxvm's own
servers refuse a QEMU (``peers``).

Python has no binding for Landlock's three system calls, hence ``ctypes``; their numbers
are the same on every architecture (new system calls share one table).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from boxvm.disks.layers import LIVE_DIR

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
MAKE_SOCK = 1 << 9
_ABI1 = (1 << 13) - 1  # execute … make_sym: every right of ABI 1
REFER, TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
# Not handled: IOCTL_DEV (ABI 5), since which device files open is already decided here.
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE  # the rights a rule on a file may hold
_SCOPES = (1 << 0) | (1 << 1)  # ABI 6: abstract unix sockets and signals outside the domain

SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
OWN_PROC = ("status", "stat", "statm", "cmdline", "maps", "auxv", "limits", "fd", "fdinfo")  # not net/: every socket
PROC = ("filesystems", "meminfo", "cpuinfo", "stat", "sys/vm", "sys/kernel")  # besides its own /proc/<pid>
ETC = ("ld.so.cache", "ld.so.preload", "localtime", "resolv.conf", "hosts", "nsswitch.conf", "host.conf", "gai.conf")
DEVICES = ("null", "zero", "urandom", "random", "kvm")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or it is disabled)."""
    version = _libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


@dataclass(frozen=True)
class Policy:
    """An open Landlock ruleset, for :meth:`enter` in the child between fork and exec
    (``preexec_fn``): the child then holds only what the ruleset grants."""

    fd: int
    abi: int

    def enter(self) -> None:
        """Restrict the calling process (and all it starts) to the ruleset, with a few files
        of its own ``/proc/<pid>`` readable (``OWN_PROC``: not the other processes' command
        lines and environments, nor its ``net/``, which lists every socket's path). A
        failure raises, and the child is not executed: a QEMU never runs less confined than
        it was meant to."""
        for name in OWN_PROC:
            _allow(self, Path(f"/proc/{os.getpid()}") / name, READ_FILE | READ_DIR)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or _libc.syscall(_RESTRICT_SELF, self.fd, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"Landlock: {os.strerror(err)}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def for_qemu(box_dir: Path, reads: Iterable[Path], writes: Iterable[Path], binary: str) -> Policy:
    """The ruleset of a box's QEMU (see the module): sockets in ``box_dir``, its files in
    ``box_dir/live``, each of ``writes`` read-write and each of ``reads`` read-only (files),
    and what any QEMU run needs. Paths that do not exist are left out, but ``box_dir``.
    Raises OSError where the kernel has no Landlock."""
    version = abi()
    if version < 1:
        raise OSError("this kernel has no Landlock")
    handled = _handled(version)
    attr = struct.pack("=QQQ", handled, 0, _SCOPES) if version >= 6 else struct.pack("=Q", handled)
    fd = _libc.syscall(_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"Landlock ruleset: {os.strerror(err)}")
    policy = Policy(int(fd), version)
    try:
        read_tree = READ_FILE | READ_DIR | EXECUTE
        real = Path(os.path.realpath(binary))
        # QEMU finds its modules and firmware beside its bin/ (``bin/../lib/…/qemu``,
        # ``bin/../share/qemu``): those, never the prefix, which may be a home directory.
        prefix = real.parent.parent
        beside = [prefix / "share" / name for name in ("qemu", "seabios", "ipxe")]
        beside += [prefix / "libexec" / "qemu", *prefix.glob("lib*/qemu"), *prefix.glob("lib*/*/qemu")]
        for tree in (*map(Path, SYSTEM), *beside):
            _allow(policy, tree, read_tree)
        _allow(policy, real, READ_FILE | EXECUTE)
        _allow(policy, Path("/sys"), READ_FILE | READ_DIR)
        for name in PROC:
            _allow(policy, Path("/proc") / name, READ_FILE | READ_DIR)
        for name in ETC:
            _allow(policy, Path("/etc") / name, READ_FILE)
        # A rule on a file holds its inode, and hosts replace resolv.conf by a rename (which
        # libslirp notices, and reads again): its directory, unless that is /etc itself.
        resolv = Path(os.path.realpath("/etc/resolv.conf")).parent
        if resolv != Path("/etc"):
            _allow(policy, resolv, READ_FILE | READ_DIR)
        for name in DEVICES:
            _allow(policy, Path("/dev") / name, READ_FILE | WRITE_FILE)
        for path in reads:
            _allow(policy, path, READ_FILE)
        written = READ_FILE | WRITE_FILE | TRUNCATE  # (each rule keeps what this ABI handles)
        for path in writes:
            _allow(policy, path, written)
        _allow(policy, box_dir, MAKE_SOCK, missing_ok=False)
        _allow(policy, box_dir / LIVE_DIR, written)
    except BaseException:
        policy.close()
        raise
    return policy


def _handled(version: int) -> int:
    return _ABI1 | (REFER if version >= 2 else 0) | (TRUNCATE if version >= 3 else 0)


def _allow(policy: Policy, path: Path, rights: int, missing_ok: bool = True) -> None:
    """Grant ``rights`` beneath ``path`` (a directory) or on it (a file: only file rights)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = struct.pack("=Qi", rights & _handled(policy.abi), fd)
        if _libc.syscall(_ADD_RULE, policy.fd, _RULE_PATH_BENEATH, ctypes.c_char_p(rule), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"Landlock rule for {path.name}: {os.strerror(err)}")
    finally:
        os.close(fd)
