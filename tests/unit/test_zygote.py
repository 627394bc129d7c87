"""The zygote that forks box supervisors (``engine/zygote``): a box outlives the process
that started it and the zygote, a killed zygote is replaced at the next start, and nothing
is left behind (no zombie, no child of the zygote, no process of the caller).

The "QEMU" of these boxes is ``sh`` (it records the environment it got, then sleeps): the
supervisor, the zygote, the forks and the detaching are the real ones; no VM is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from boxvm.engine import zygote
from boxvm.paths import Home
from boxvm.processes import alive
from boxvm.state.boxes import pid_is
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store

START = "import asyncio, sys; from pathlib import Path; from boxvm.engine import zygote; " + (
    "asyncio.run(zygote.start_supervisor(Path(sys.argv[1]), Path(sys.argv[2]), 'test'))"
)


def fake_box(home: Home, box_id: str) -> Path:
    """A box being started: its record (a supervisor runs only for the start that wrote its
    vm.json) and a vm.json whose "QEMU" says what it was started with."""
    box_dir = home.box_dir(box_id)
    box_dir.mkdir(parents=True)
    (box_dir / "disk.qcow2").touch()
    token = time.time()
    record = BoxRecord(id=box_id, name=box_id, status=BoxStatus.STARTING, image="x", options={}, mac="m")
    record.started_at = token
    store = Store(home.db)
    store.insert_box(record)
    store.close()
    qemu = ["sh", "-c", f'echo "${{ZYGOTE_TEST_MARK:-unset}} $(umask)" > {box_dir}/seen; exec sleep 60']
    cfg = {"box_id": box_id, "argv": qemu, "db": str(home.db), "home": str(home.root), "start": token}
    (box_dir / "vm.json").write_text(json.dumps(cfg))
    return box_dir


def start(home: Home, box_dir: Path, mark: str, umask: str) -> None:
    """Start the box's supervisor from a separate caller process (with this umask), which then exits."""
    env = {**os.environ, "ZYGOTE_TEST_MARK": mark}
    argv = ["sh", "-c", f'umask {umask}; exec "$0" "$@"', sys.executable, "-c", START, str(home.root), str(box_dir)]
    subprocess.run(argv, env=env, check=True, timeout=60)


def peer_pid(sock: Path) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        return struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]


def wait_for(path: Path) -> str:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    return path.read_text().strip()


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def home() -> Iterator[Home]:
    # Not under tmp_path: with xdist its path is too long for the zygote's socket (108 bytes
    # with the name it binds first), and the supervisors would be started directly.
    root = Path(tempfile.mkdtemp(prefix="bz-", dir="/tmp"))
    home = Home.default(root)
    home.ensure()
    assert len(os.fsencode(zygote.socket_path(home.root, zygote.fingerprint()))) + zygote.BIND_ROOM < 108
    yield home
    for sock in [*home.root.glob("zygote-*.sock"), *home.boxes.glob("*/ctl.sock")]:
        with contextlib.suppress(OSError):
            os.kill(peer_pid(sock), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def test_boxes_outlive_the_caller_and_the_zygote_which_is_replaced_when_killed(home: Home) -> None:
    first = fake_box(home, "b1")
    start(home, first, "one", "0027")  # the caller process has exited when this returns
    # The caller's umask, not the zygote's; the caller's environment for the supervisor, not
    # for QEMU (which gets its own: no tokens or keys of the caller's)
    assert wait_for(first / "seen") == "unset 0027"
    supervisor = peer_pid(first / "ctl.sock")
    assert psutil.Process(supervisor).environ().get("ZYGOTE_TEST_MARK") == "one"
    assert pid_is(supervisor, "b1")  # found by its command line, as a directly started one
    (zsock,) = home.root.glob("zygote-*.sock")
    first_zygote = peer_pid(zsock)
    proc = psutil.Process(supervisor)
    assert proc.ppid() != first_zygote and proc.pid != first_zygote
    assert os.getsid(supervisor) == supervisor  # its own session: no terminal's hangup reaches it
    assert psutil.Process(first_zygote).children() == []  # the middle child was reaped: no zombie

    os.kill(first_zygote, signal.SIGKILL)
    assert gone(first_zygote)
    assert alive(supervisor) and (first / "ctl.sock").exists()  # the box does not need the zygote

    second = fake_box(home, "b2")
    start(home, second, "two", "0022")  # finds the dead zygote's socket, starts a new one
    start(home, fake_box(home, "b3"), "three", "0077")  # and the new one serves the next caller's umask
    assert wait_for(second / "seen") == "unset 0022"
    assert wait_for(home.box_dir("b3") / "seen") == "unset 0077"
    assert peer_pid(zsock) not in (first_zygote, 0)
    qemu = psutil.Process(peer_pid(second / "ctl.sock")).children()
    assert [p.name() for p in qemu] == ["sleep"]

    (first_qemu,) = proc.children()
    os.kill(supervisor, signal.SIGKILL)
    assert gone(supervisor) and gone(first_qemu.pid)  # QEMU goes with its supervisor
    assert not any(p.info["cmdline"] and str(first) in " ".join(p.info["cmdline"])
                   for p in psutil.process_iter(["cmdline"]))  # fmt: skip


def test_a_zygote_serves_only_its_own_home_and_a_supervisor_that_fails_is_an_error(home: Home) -> None:
    box = fake_box(home, "b4")
    (box / "vm.json").write_text("{}")  # the supervisor dies reading it, before it listens
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", START, str(home.root), str(box)], check=True, timeout=60,
                       capture_output=True)  # fmt: skip
    (zsock,) = home.root.glob("zygote-*.sock")
    assert zsock.stat().st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX) as s:  # a box of another home: refused before any fork
        s.connect(str(zsock))
        s.sendall(json.dumps({"box_dir": "/elsewhere/boxes/x", "env": {}, "cwd": "/"}).encode() + b"\n")
        assert s.recv(1) == b""
    assert zygote.fingerprint() in zsock.name
