"""A pre-imported parent that forks box supervisors: a start costs a ``fork()``, not an interpreter.

A fresh ``python -m boxvm.engine.supervisor`` spends 0.25 s of CPU on a quiet host (0.5 s
under load) importing before it does anything, which is a quarter of a resume and most of
a fork's host-side cost. So one process per home and per version of the code (the
*zygote*) imports the supervisor once and waits on ``zygote-<fingerprint>.sock`` in the
home; each start sends it the box directory, the caller's environment, working
directory and umask, and it forks twice: the grandchild (reparented to init, in its own
session, as the directly started supervisor is) takes those, renames itself to the
command line a directly started supervisor has (``pid_is`` and ``ps`` find boxes by it),
and runs the supervisor, which tells the caller ``ok`` over the same connection once its
control socket listens. A box never depends on the zygote after that.

The zygote is started by the first start that finds none (under a lock file, once), is
replaced the same way when it was killed, exits when the sources it imported change (the
fingerprint covers them) or after ``IDLE_EXIT`` without a request, and takes requests only
from its own user. ``BOXVM_ZYGOTE=0``, or a zygote that cannot be started, falls back to
starting the supervisor directly. The supervisors share the zygote's cgroup and resource
limits (those of the first caller), not each caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from boxvm.engine import peers
from boxvm.errors import EngineError

IDLE_EXIT = 600.0  # seconds without a request before a zygote exits
CHECK_EVERY = 20.0  # how often an idle zygote checks its sources and its home
MAX_REQUEST = 4 << 20  # an environment is rarely over a few KiB
BOX_ID_ROOM = 64 + len("/boxes/")  # a box directory's length beyond the home's
SUN_PATH_MAX = 108  # sockaddr_un.sun_path, with its terminating NUL
BIND_ROOM = len(".") + len(".") + 7  # the zygote binds ".<name>.<pid>" first (pids: up to 7 digits)
FORKED = b"F"  # sent before the fork: without it the caller may retry, with it never (no double start)


def fingerprint() -> str:
    """The interpreter and the boxvm sources a zygote would run: a change to either makes
    a new zygote (a stale one would start supervisors of the old code)."""
    h = hashlib.sha256(sys.executable.encode())
    root = Path(__file__).resolve().parent.parent  # the boxvm package (not `import boxvm`: a cycle)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{dirpath}/{name}:{st.st_mtime_ns}:{st.st_size}\0".encode())
    return h.hexdigest()[:16]


def socket_path(home_root: Path, fp: str) -> Path:
    return home_root / f"zygote-{fp}.sock"


# -- the caller's side --------------------------------------------------------------------
async def start_supervisor(home_root: Path, box_dir: Path, label: str) -> None:
    """Start ``box_dir``'s supervisor, detached; return once its control socket listens.

    EngineError if it did not come up (its log says why)."""
    home_root, box_dir = home_root.absolute(), box_dir.absolute()  # the zygote runs in /
    if os.environ.get("BOXVM_ZYGOTE") != "0":
        fp = await asyncio.to_thread(fingerprint)
        path = socket_path(home_root, fp)
        if len(os.fsencode(path)) + BIND_ROOM >= SUN_PATH_MAX:  # no socket can be bound there: start directly
            return await _start_directly(box_dir, label)
        request = {"box_dir": str(box_dir), "env": dict(os.environ), "cwd": os.getcwd(), "umask": _umask()}
        payload = json.dumps(request).encode() + b"\n"
        for attempt in range(3):
            outcome = await _through_zygote(path, payload)
            if outcome is True:
                return
            if outcome is False:
                raise EngineError(f"the supervisor of box {label!r} failed to start; see {box_dir}/supervisor.log")
            if attempt < 2 and not await asyncio.to_thread(_ensure_zygote, home_root, path):
                break  # none can be started here: start the supervisor directly
    await _start_directly(box_dir, label)


def _umask() -> int:
    """This process's umask, read without setting it (``os.umask`` would, for every thread)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


async def _through_zygote(path: Path, payload: bytes) -> bool | None:
    """True: started; False: forked but the supervisor failed; None: no zygote answered
    (none runs, or it died before forking), so nothing was started."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return None
    try:
        writer.write(payload)
        await writer.drain()
        if await reader.read(1) != FORKED:
            return None
        return await reader.readexactly(2) == b"ok"
    except asyncio.IncompleteReadError:
        return False
    except OSError:
        return None
    finally:
        writer.close()


async def _start_directly(box_dir: Path, label: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "boxvm.engine.supervisor", str(box_dir),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    if await proc.wait() != 0:
        raise EngineError(f"the supervisor of box {label!r} failed to start; see {box_dir}/supervisor.log")


def _ensure_zygote(home_root: Path, path: Path) -> bool:
    """Start the zygote for ``path`` unless one answers there (one starter at a time, under
    the home's lock file); False if it could not be started."""
    fd = os.open(home_root / "zygote.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return True  # another caller started it meanwhile
            except OSError:
                path.unlink(missing_ok=True)  # a killed zygote's
        argv = [sys.executable, "-m", "boxvm.engine.zygote", str(home_root), str(path)]
        # Room in the command line for the supervisors' own (see _retitle).
        argv.append("." * (len("boxvm.engine.supervisor") + BOX_ID_ROOM + 16))
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, timeout=60, check=False,
        )  # fmt: skip
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.close(fd)


# -- the zygote ---------------------------------------------------------------------------
def main() -> None:
    home_root, path = Path(sys.argv[1]), Path(sys.argv[2])
    fp = fingerprint()  # before importing: a source changed while importing makes it stale at once
    if path.name != socket_path(home_root, fp).name or _title_room() < len(_title(home_root / "boxes" / ("0" * 64))):
        sys.exit(1)
    from boxvm.engine import supervisor  # the imports every supervisor would pay for

    ready_r, ready_w = os.pipe()
    if os.fork() > 0:  # the starter returns once the socket listens
        os.close(ready_w)
        os._exit(0 if os.read(ready_r, 2) == b"ok" else 1)
    os.close(ready_r)
    os.setsid()
    # Listening here, in the daemon: a client's SO_PEERCRED names the process that listened.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)
    listener.listen(64)
    os.rename(tmp, path)
    inode = os.stat(path).st_ino
    os.write(ready_w, b"ok")
    os.close(ready_w)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for stdio in (0, 1, 2):
        os.dup2(devnull, stdio)
    os.close(devnull)
    gc.freeze()  # the imported objects stay in pages the forked supervisors share
    listener.settimeout(CHECK_EVERY)
    last = time.monotonic()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if time.monotonic() - last > IDLE_EXIT or not _still_current(path, inode, fp):
                break
            continue
        last = time.monotonic()
        with conn:
            # (The caller found this socket by the fingerprint of the sources it sees now.)
            request = _read_request(conn)
            if request is not None and _still_current(path, inode, None):
                with contextlib.suppress(OSError):  # fork() refused (EAGAIN): that start fails, we go on
                    _fork_supervisor(listener, conn, request, home_root, supervisor.serve)
            elif request is not None:
                break  # our socket was removed or replaced: the caller retries with the current one
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            path.unlink()


def _still_current(path: Path, inode: int, fp: str | None) -> bool:
    """Our socket is still the one in the home (not removed or replaced) and, if ``fp`` is
    given, the sources are those we imported."""
    try:
        return os.stat(path).st_ino == inode and (fp is None or fingerprint() == fp)
    except OSError:
        return False


def _read_request(conn: socket.socket) -> dict[str, Any] | None:
    """The caller's request, if it is our own user's (not a QEMU's) and well-formed (bounded
    in size and time)."""
    if not peers.trusted(conn):  # another user's process, or a box's QEMU
        return None
    conn.settimeout(5)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk or len(data) + len(chunk) > MAX_REQUEST:
                return None
            data += chunk
        request = json.loads(data)
    except (OSError, ValueError):
        return None
    ok = isinstance(request, dict) and isinstance(request.get("box_dir"), str) and isinstance(request.get("cwd"), str)
    ok = ok and isinstance(request.get("umask"), int) and 0 <= request["umask"] <= 0o777
    env = request.get("env") if ok else None
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return None
    return request


def _fork_supervisor(listener: socket.socket, conn: socket.socket, request: dict[str, Any], home_root: Path,
                     serve: Any) -> None:  # fmt: skip
    box_dir = Path(request["box_dir"])
    if box_dir.parent != home_root / "boxes":
        return  # another home's box: its own zygote starts it
    try:
        conn.sendall(FORKED)
    except OSError:
        return
    pid = os.fork()
    if pid > 0:
        os.waitpid(pid, 0)  # the middle child exits at once
        return
    try:  # the middle child, whose child (in a session of its own) init will reap
        listener.close()
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        with contextlib.suppress(OSError):
            os.chdir(request["cwd"])
        _retitle(_title(box_dir))
        notify = os.dup(conn.fileno())
        conn.close()
        serve(box_dir, notify)
        os._exit(0)
    except BaseException:
        os._exit(1)


def _title(box_dir: Path) -> bytes:
    """The command line of a directly started supervisor of ``box_dir``."""
    return b"\0".join(os.fsencode(a) for a in (sys.executable, "-m", "boxvm.engine.supervisor", str(box_dir))) + b"\0"


def _arg_area() -> tuple[int, int]:
    """Start and end of this process's argv strings (``/proc/self/stat`` fields 48 and 49)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[45]), int(fields[46])


def _title_room() -> int:
    start, end = _arg_area()
    return end - start


def _retitle(title: bytes) -> None:
    """Make ``/proc/self/cmdline`` read ``title`` by overwriting the argv strings in place
    (what the setproctitle package does; not a dependency of boxvm, and this is the one
    Linux case it needs). ``main`` checked the room, so this never truncates."""
    start, end = _arg_area()
    data = title.ljust(end - start, b"\0")[: end - start]
    ctypes.memmove(start, data, len(data))


if __name__ == "__main__":
    main()
