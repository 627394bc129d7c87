"""Who connected to one of boxvm's unix sockets: a box's QEMU is turned away.

A QEMU confined by Landlock (``engine/confine``) can still connect to a named unix socket of
its user: no Landlock ABI so far limits that. The zygote's socket and every supervisor's
``ctl.sock`` are such sockets, so a taken-over QEMU could have another box's supervisor run
commands in that box's guest, or the zygote start a supervisor in an environment of its
choosing. QEMU's seccomp sandbox (``-sandbox spawn=deny``) lets it neither fork nor execute a
program, so whatever it connects has the QEMU process itself as the peer (``SO_PEERCRED``),
and that process's executable is a ``qemu-system-*``.
"""

from __future__ import annotations

import os
import socket
import struct

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def credentials(sock: socket.socket) -> tuple[int, int]:
    """The peer's pid and uid, as the kernel recorded them when it connected."""
    pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid


def trusted(sock: socket.socket) -> bool:
    """The peer is a process of this user and not a QEMU (one whose executable cannot be
    read, gone already or another user's, is not trusted either)."""
    pid, uid = credentials(sock)
    if uid != os.getuid():
        return False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return not os.path.basename(exe).startswith("qemu-system")
