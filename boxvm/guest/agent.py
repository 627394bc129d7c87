"""boxvm guest agent: PID 1 of the guest once the init script has mounted everything.

It serves the framed protocol of ``protocol.py`` on the virtio-serial port named
``boxvm.agent``. One single-threaded poll loop multiplexes the port, every child's
pipes and the SIGCHLD wake-up pipe, so concurrent execs cost no threads. Start-up
imports are deliberately few (Python start-up is slow under TCG); tarfile is only
imported inside the forked child that needs it.

Runs inside the guest with the guest's Python 3.11 and its stdlib only.
"""

import contextlib
import fcntl
import json
import os
import select
import signal
import sys
import time
import warnings  # noqa: F401  os.execvpe imports it lazily, which fails after chroot

import protocol as P

ROOT = "/c"  # the container filesystem, mounted by the init script
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
TIOCSWINSZ = 0x5414
RNDADDENTROPY = 0x40085203  # _IOW('R', 3, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 7)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg):
    sys.stderr.write(f"boxvm-agent: {msg}\n")
    sys.stderr.flush()


def find_port():
    base = "/sys/class/virtio-ports"
    for _ in range(200):
        if os.path.isdir(base):
            for entry in os.listdir(base):
                try:
                    with open(f"{base}/{entry}/name") as f:
                        if f.read().strip() == "boxvm.agent":
                            return f"/dev/{entry}"
                except OSError:
                    pass
        time.sleep(0.05)
    raise SystemExit("boxvm-agent: virtio port boxvm.agent not found")


class UserError(Exception):
    """A request the agent refuses; reported to the host as InvalidArgument/NotFound."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def _read_db(path):
    try:
        with open(ROOT + path) as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(spec):
    """Map ``name``, ``uid``, ``name:group`` or ``uid:gid`` to (uid, gid, groups, home, name)."""
    spec = spec or "root"
    user, _, group = spec.partition(":")
    passwd = _read_db("/etc/passwd")
    entry = None
    for row in passwd:
        if len(row) >= 7 and (row[0] == user or (user.isdigit() and row[2] == user)):
            entry = row
            break
    if entry is None:
        if not user.isdigit():
            raise UserError("NotFound", f"user {user!r} is not in the box's /etc/passwd")
        uid, gid, home, name = int(user), int(user), "/", user
    else:
        uid, gid, home, name = int(entry[2]), int(entry[3]), entry[5] or "/", entry[0]
    groups_db = _read_db("/etc/group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [row for row in groups_db if row and row[0] == group]
            if not match:
                raise UserError("NotFound", f"group {group!r} is not in the box's /etc/group")
            gid = int(match[0][2])
    groups = {gid}
    for row in groups_db:
        if len(row) >= 4 and name in row[3].split(","):
            groups.add(int(row[2]))
    return uid, gid, sorted(groups), home, name


class Channel:
    def __init__(self, cid):
        self.cid = cid
        self.pid = None
        self.outputs = {}  # fd -> frame type
        self.stdin_fd = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.credit = P.WINDOW
        self.status = None
        self.deadline = None
        self.timed_out = False
        self.discard = False
        self.tty = False
        self.leftover = bytearray()  # a hung-up pty's last output, sent as credit allows


class Agent:
    def __init__(self, port_path):
        self.port = os.open(port_path, os.O_RDWR | os.O_CLOEXEC)
        self.decoder = P.Decoder()
        self.channels = {}
        self.by_pid = {}
        self.port_hup_until = 0.0
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    # -- output to the host ---------------------------------------------------------
    def send(self, frame):
        view = memoryview(frame)
        while view:
            try:
                n = os.write(self.port, view)
            except BlockingIOError:
                select.select([], [self.port], [], 1.0)
                continue
            except OSError as exc:  # host side went away: nothing to tell it
                log(f"port write failed: {exc}")
                return
            view = view[n:]

    def result(self, cid, **fields):
        self.send(P.pack_json(cid, P.RESULT, fields))

    # -- requests -------------------------------------------------------------------
    def on_frame(self, cid, ftype, payload):
        if ftype == P.OPEN:
            try:
                self.open(cid, json.loads(payload))
            except UserError as exc:
                self.result(cid, error={"type": exc.kind, "message": str(exc)})
            except Exception as exc:  # the agent must outlive any bad request
                self.result(cid, error={"type": "EngineError", "message": f"{type(exc).__name__}: {exc}"})
            return
        chan = self.channels.get(cid)
        if chan is None:
            return  # late frame for a finished channel
        if ftype == P.STDIN:
            chan.stdin_buf += payload
        elif ftype == P.EOF:
            chan.stdin_eof = True
        elif ftype == P.CREDIT:
            chan.credit += P.unpack_credit(payload)
        elif ftype == P.SIGNAL:
            self.kill(chan, json.loads(payload)["signal"])
        elif ftype == P.RESIZE:
            size = json.loads(payload)
            if chan.tty:
                self.set_winsize(chan.stdin_fd, size["rows"], size["cols"])
        elif ftype == P.CLOSE:
            chan.discard = True
            chan.credit = 1 << 62
            chan.leftover.clear()
            self.kill(chan, signal.SIGKILL)

    def open(self, cid, req):
        op = req.get("op")
        if op == "ping":
            self.result(cid, ok=True, uptime=_uptime())
        elif op == "exec":
            self.spawn(cid, req, None)
        elif op == "put":
            self.spawn(cid, {"user": "root", "cwd": "/"}, ("put", req["path"]))
        elif op == "get":
            self.spawn(cid, {"user": "root", "cwd": "/"}, ("get", req["path"]))
        elif op == "sync":
            os.sync()
            self.result(cid, ok=True)
        elif op in ("freeze", "thaw"):
            fd = os.open(ROOT, os.O_RDONLY)
            started = time.monotonic()
            try:
                fcntl.ioctl(fd, FIFREEZE if op == "freeze" else FITHAW, 0)
            except OSError as exc:
                raise UserError("QuiesceError", f"{op} of the container filesystem failed: {exc}") from exc
            finally:
                os.close(fd)
            # The guest's own clock: writers block from the start of the freeze to the
            # end of the thaw, which is the pause the box sees.
            self.result(cid, ok=True, started=started, at=time.monotonic())
        elif op == "clock":  # the host reads and steps the wall clock: the guest has no NTP
            if req.get("step_ns"):
                now = time.clock_gettime_ns(time.CLOCK_REALTIME)
                time.clock_settime_ns(time.CLOCK_REALTIME, now + int(req["step_ns"]))
            self.result(cid, ok=True, ns=time.time_ns())
        elif op == "reseed":  # a resumed VM: its RNG state is a copy; mix in fresh host entropy
            reseed(bytes.fromhex(req["entropy"])[:256])
            self.result(cid, ok=True)
        elif op == "reidentify":  # a fork or warm start: another box's guest becomes this box
            reidentify(req.get("hostname"), req.get("machine_id"))
            self.result(cid, ok=True)
        elif op == "shutdown":
            self.shutdown()
            self.result(cid, ok=True)
        else:
            raise UserError("InvalidArgument", f"unknown agent operation {op!r}")

    def spawn(self, cid, req, builtin):
        argv = req.get("argv") or []
        if builtin is None and (not argv or not all(isinstance(a, str) and "\0" not in a for a in argv)):
            raise UserError("InvalidArgument", "argv must be a non-empty list of strings without NUL")
        uid, gid, groups, home, name = resolve_user(req.get("user"))
        env = {"PATH": DEFAULT_PATH, "HOME": home, "USER": name, "HOSTNAME": os.uname().nodename}
        env.update(req.get("env") or {})
        if any("\0" in k or "=" in k or "\0" in v for k, v in env.items()):
            raise UserError("InvalidArgument", "environment names and values must not contain NUL or '='")
        cwd = req.get("cwd") or "/"
        chan = Channel(cid)
        chan.tty = bool(req.get("tty"))
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if chan.tty:
            master, slave = os.openpty()
            self.set_winsize(master, req.get("rows") or 24, req.get("cols") or 80)
            child_fds = (slave, slave, slave)
            chan.outputs = {master: P.STDOUT}
            chan.stdin_fd = master
            env.setdefault("TERM", "xterm")
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            e_r, e_w = os.pipe2(os.O_CLOEXEC)
            child_fds = (in_r, out_w, e_w)
            chan.outputs = {out_r: P.STDOUT, e_r: P.STDERR}
            chan.stdin_fd = in_w
        pid = os.fork()
        if pid == 0:  # child: never returns
            _child(chan.tty, child_fds, err_w, cwd, uid, gid, groups, argv, env, builtin)
        os.close(err_w)
        for fd in set(child_fds):
            os.close(fd)
        for fd in [*chan.outputs, chan.stdin_fd]:
            os.set_blocking(fd, False)
        failure = _read_all(err_r)
        os.close(err_r)
        chan.pid = pid
        if req.get("timeout"):
            chan.deadline = time.monotonic() + float(req["timeout"])
        self.channels[cid] = chan
        self.by_pid[pid] = chan
        if failure:  # exec itself failed: report like a shell would
            failure = failure[: P.CHUNK]
            chan.credit -= len(failure)  # the host counts every output byte against the window
            self.send(P.pack(cid, P.STDERR, failure))

    @staticmethod
    def set_winsize(fd, rows, cols):
        import struct

        fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def kill(self, chan, sig):
        if chan.pid is not None and chan.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(chan.pid, sig)

    def shutdown(self):
        for chan in list(self.channels.values()):
            self.kill(chan, signal.SIGKILL)
        os.sync()
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for mnt in reversed(mounts):
            if mnt == ROOT or mnt.startswith(ROOT + "/"):
                _run(["/bin/busybox", "umount", "-l" if mnt != ROOT else "-r", mnt])
        _run(["/bin/busybox", "umount", ROOT])
        os.sync()

    # -- the loop -------------------------------------------------------------------
    def serve(self):
        self.send(P.pack_json(0, P.HELLO, {"version": 1, "uptime": _uptime()}))
        while True:
            poller = select.poll()
            now = time.monotonic()
            if now >= self.port_hup_until:
                poller.register(self.port, select.POLLIN)
            poller.register(self.wake_r, select.POLLIN)
            timeout = 1000
            for chan in self.channels.values():
                if chan.credit > 0:
                    for fd in chan.outputs:
                        poller.register(fd, select.POLLIN)
                if chan.stdin_fd is not None and chan.stdin_buf and not chan.tty:
                    poller.register(chan.stdin_fd, select.POLLOUT)
                if chan.deadline is not None and chan.status is None:
                    timeout = min(timeout, max(0, int((chan.deadline - now) * 1000)))
            for fd, events in poller.poll(timeout):
                if fd == self.port:
                    self.read_port()
                elif fd == self.wake_r:
                    _read_all(self.wake_r)
                else:
                    self.pump(fd, events)
            self.flush_stdin()
            self.reap()
            self.expire()
            self.finish()

    def read_port(self):
        """The host's frames. The agent is PID 1: a read error or a garbled header must not
        end it (its exit panics the kernel and the box dies), so it is logged and dropped."""
        try:
            data = os.read(self.port, 1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:  # the host side reset under us: back off as for a hang-up
            log(f"port read failed: {exc}")
            data = b""
        if not data:  # host not connected: poll would spin on HUP, so back off
            self.port_hup_until = time.monotonic() + 0.1
            return
        try:
            frames = self.decoder.feed(data)
        except ValueError as exc:  # out of step with the host: drop what is buffered
            log(f"dropped {len(data)} bytes from the host: {exc}")
            self.decoder = P.Decoder()
            return
        for cid, ftype, payload in frames:
            self.on_frame(cid, ftype, payload)

    def pump(self, fd, events):
        for chan in self.channels.values():
            if fd in chan.outputs:
                break
        else:
            return
        try:
            data = os.read(fd, min(P.CHUNK, max(chan.credit, 1)))
        except BlockingIOError:
            return
        except OSError:  # EIO on a pty master once the last slave closed
            data = b""
        if not data:
            self.close_output(chan, fd)
            return
        if not chan.discard:
            chan.credit -= len(data)
            self.send(P.pack(chan.cid, chan.outputs[fd], data))

    @staticmethod
    def close_output(chan, fd):
        chan.outputs.pop(fd)
        os.close(fd)
        if fd == chan.stdin_fd:  # a pty master is both
            chan.stdin_fd = None

    def flush_stdin(self):
        for chan in self.channels.values():
            if chan.stdin_fd is None:
                continue
            written = 0
            while chan.stdin_buf:
                try:
                    n = os.write(chan.stdin_fd, chan.stdin_buf[: P.CHUNK])
                except BlockingIOError:
                    break
                except OSError:  # reader gone: drop what is left
                    written += len(chan.stdin_buf)
                    chan.stdin_buf.clear()
                    break
                del chan.stdin_buf[:n]
                written += n
            if written and not chan.discard:
                self.send(P.pack_credit(chan.cid, written))
            if chan.stdin_eof and not chan.stdin_buf and not chan.tty:
                os.close(chan.stdin_fd)
                chan.stdin_fd = None

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            chan = self.by_pid.pop(pid, None)
            if chan is not None:
                code = os.waitstatus_to_exitcode(status)
                chan.status = code if code >= 0 else 128 - code

    def expire(self):
        now = time.monotonic()
        for chan in self.channels.values():
            if chan.deadline is not None and chan.status is None and now >= chan.deadline:
                chan.timed_out = True
                chan.deadline = None
                self.kill(chan, signal.SIGKILL)

    def finish(self):
        for cid, chan in list(self.channels.items()):
            if chan.status is None:
                continue
            if chan.tty and chan.outputs:
                # The session leader is gone but background jobs may hold the pty open:
                # keep what the pty still holds, then close it like a terminal hang-up.
                for fd in list(chan.outputs):
                    if not chan.discard:
                        chan.leftover += _read_all(fd)
                    self.close_output(chan, fd)
            while chan.leftover and chan.credit > 0:  # never past the host's window
                data = bytes(chan.leftover[: min(P.CHUNK, chan.credit)])
                del chan.leftover[: len(data)]
                chan.credit -= len(data)
                self.send(P.pack(chan.cid, P.STDOUT, data))
            if chan.outputs or chan.leftover:
                continue
            if chan.stdin_fd is not None:
                os.close(chan.stdin_fd)
            del self.channels[cid]
            if not chan.discard:
                self.result(cid, exit_code=chan.status, timed_out=chan.timed_out)


def reseed(entropy):
    """Credit ``entropy`` to the kernel RNG and reseed its CRNG now (RNDADDENTROPY alone
    waits for the next periodic reseed, up to a minute later on Linux 5.18+)."""
    import struct

    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def reidentify(hostname, machine_id):
    """Take a new box's hostname and machine-id: the kernel's hostname, and the tmpfs files
    the init script bind-mounted over the container's /etc (rewritten in place: a bind mount
    pins the inode, a renamed file would not show through)."""
    if not (isinstance(hostname, str) and 0 < len(hostname) <= 64 and hostname.isascii()):
        raise UserError("InvalidArgument", "hostname must be 1-64 ASCII characters")
    if not all(c.isalnum() or c in "-._" for c in hostname):
        raise UserError("InvalidArgument", "hostname may hold only letters, digits, '-', '.' and '_'")
    if not (isinstance(machine_id, str) and len(machine_id) == 32 and all(c in "0123456789abcdef" for c in machine_id)):
        raise UserError("InvalidArgument", "machine_id must be 32 lowercase hex digits")
    files = {
        "/proc/sys/kernel/hostname": hostname,  # sethostname(2) without importing socket
        "/run/hostname": hostname + "\n",
        "/run/machine-id": machine_id + "\n",
        "/run/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost\n",
    }
    for path, text in files.items():
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _uptime():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _read_all(fd):
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EAGAIN: nothing more now; EIO: pty hung up
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _run(argv):
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


def _child(tty, fds, err_w, cwd, uid, gid, groups, argv, env, builtin):
    """Runs in the forked child: enter the container, drop privileges, exec. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if tty:
            os.login_tty(fds[0])
        else:
            os.setsid()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
        if builtin is not None:
            import tarfile  # noqa: F401  must be loaded before chroot hides the guest's stdlib
        os.umask(0o022)
        os.chroot(ROOT)
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise UserError("NotFound", f"working directory {cwd}: {exc.strerror}") from exc
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        if builtin is not None:
            os.close(err_w)
            try:
                _builtin(*builtin)
            except Exception as exc:
                os.write(2, f"boxvm: {type(exc).__name__}: {exc}\n".encode())
                os._exit(1)
            os._exit(0)
        try:
            os.execvpe(argv[0], argv, env)
        except FileNotFoundError:
            os.write(err_w, f"boxvm: {argv[0]}: command not found\n".encode())
            os._exit(127)
        except PermissionError as exc:
            os.write(err_w, f"boxvm: {argv[0]}: {exc.strerror}\n".encode())
            os._exit(126)
    except BaseException as exc:
        try:
            os.write(err_w, f"boxvm: {exc}\n".encode())
        finally:
            os._exit(126 if builtin is None else 1)


def _builtin(op, path):
    """File copy as tar streams on stdin/stdout, inside the chroot so links stay in the box."""
    import tarfile

    if op == "get":
        if not os.path.lexists(path):
            sys.stderr.write(f"boxvm: {path}: no such file or directory\n")
            os._exit(2)
        with os.fdopen(1, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
            tar.add(path, arcname=os.path.basename(path.rstrip("/")) or ".")
        return
    # put: the stream's top-level name is replaced by the target's own name unless
    # the target is an existing directory, as `docker cp` does.
    into_dir = os.path.isdir(path)
    dest_dir = path if into_dir else (os.path.dirname(path.rstrip("/")) or "/")
    rename = None if into_dir else os.path.basename(path.rstrip("/"))
    if not os.path.isdir(dest_dir):
        sys.stderr.write(f"boxvm: {dest_dir}: no such directory\n")
        os._exit(2)
    with os.fdopen(0, "rb") as src, tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if rename is not None:
                _head, sep, rest = member.name.partition("/")
                member.name = rename + sep + rest
            tar.extract(member, dest_dir)  # the guest's 3.11.2 predates filters; chroot confines it


if __name__ == "__main__":
    Agent(find_port()).serve()
