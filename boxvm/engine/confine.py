"""Landlock: a box's QEMU reaches its own files and nothing else of the host's.

seccomp (``qemu.SANDBOX``) stops a QEMU taken over through a device model (by its guest, or
by a device state it loads: every imported memory state is one) from running programs, but
not from opening files: as the user that runs boxvm it could read that user's credentials,
the home's database and token, and every other box's disks and RAM. Landlock, which needs no
privilege, limits which paths a process and its children may open. A box's QEMU keeps:

- in its box directory: reading and writing the files there, and making sockets (its QMP
  and agent sockets); not making, linking, renaming or removing anything else, so it cannot
  plant a symlink or a file where boxvm, unconfined, would follow or trust it;
- read-only, each file its caller names (its kernel, initramfs and disks' backing chains):
  files, not their directories, so no other box's layer is in reach;
- read-only, the system's programs and data (``/usr`` and the like, and QEMU's own ``lib``,
  ``libexec`` and ``share`` beside its ``bin``), ``/sys``, its own ``/proc/<pid>`` and a few
  other ``/proc`` files, and the few ``/etc`` files a C program reads;
- ``/dev/null``, ``/dev/zero``, ``/dev/urandom``, ``/dev/random`` and ``/dev/kvm``.

Where the kernel has Landlock ABI 6, signals to processes outside the domain are refused too,
so a QEMU cannot kill its supervisor or another box's QEMU. Network access is not limited:
user-mode networking connects wherever its guest does. Nor, on any ABI so far, is connecting
to a named unix socket: the servers QEMU could reach that way refuse it (``peers``).

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
_SCOPE_SIGNAL = 1 << 1  # ABI 6

SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
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
        """Restrict the calling process (and all it starts) to the ruleset, with its own
        ``/proc/<pid>`` readable (not the other processes': their command lines and
        environments). A failure raises, and the child is not executed: a QEMU never runs
        less confined than it was meant to."""
        _allow(self, Path(f"/proc/{os.getpid()}"), READ_FILE | READ_DIR)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or _libc.syscall(_RESTRICT_SELF, self.fd, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"Landlock: {os.strerror(err)}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def for_qemu(box_dir: Path, reads: Iterable[Path], binary: str) -> Policy:
    """The ruleset of a box's QEMU (see the module): its files in ``box_dir``, each of
    ``reads`` (files) read-only, and what any QEMU run needs. Paths that do not exist are
    left out. Raises OSError where the kernel has no Landlock."""
    version = abi()
    if version < 1:
        raise OSError("this kernel has no Landlock")
    handled = _handled(version)
    attr = struct.pack("=QQQ", handled, 0, _SCOPE_SIGNAL) if version >= 6 else struct.pack("=Q", handled)
    fd = _libc.syscall(_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"Landlock ruleset: {os.strerror(err)}")
    policy = Policy(int(fd), version)
    try:
        read_tree = READ_FILE | READ_DIR | EXECUTE
        real = Path(os.path.realpath(binary))
        # QEMU finds its modules and firmware beside its bin/ (``bin/../lib``, ``bin/../share``):
        # those, never the prefix itself, which may be a home directory.
        beside = [real.parent.parent / name for name in ("lib", "lib64", "libexec", "share")]
        for tree in (*map(Path, SYSTEM), *beside):
            _allow(policy, tree, read_tree)
        _allow(policy, real, READ_FILE | EXECUTE)
        _allow(policy, Path("/sys"), READ_FILE | READ_DIR)
        for name in PROC:
            _allow(policy, Path("/proc") / name, READ_FILE | READ_DIR)
        for name in ETC:
            _allow(policy, Path("/etc") / name, READ_FILE)
        for name in DEVICES:
            _allow(policy, Path("/dev") / name, READ_FILE | WRITE_FILE)
        for path in reads:
            _allow(policy, path, READ_FILE)
        own = READ_FILE | WRITE_FILE | READ_DIR | MAKE_SOCK | (TRUNCATE if version >= 3 else 0)
        _allow(policy, box_dir, own, missing_ok=False)
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
