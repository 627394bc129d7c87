"""A compromised guest against the host: host memory, waits and the console log stay bounded.

The hostile guest agent is a separate process speaking the framed protocol on the socket
the supervisor connects to as the agent's port. Everything on the host is the real thing:
``LocalBackend.start`` launches the real supervisor, which runs real QEMU (its vCPUs held
with ``-S`` and its own agent port moved aside, so the only agent the host can reach is the
hostile one) and serves the real client library behind the public ``Box`` API. The console
test floods the serial port from inside a real booted guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.disks import qcow2
from boxvm.disks.layers import GUEST_TOP, TOP
from boxvm.engine import agentlink, confine, console, qemu, qemucaps, zygote
from boxvm.guest import protocol as P
from boxvm.paths import Home
from boxvm.status import BoxStatus
from tests.helpers import rss_mib

pytestmark = pytest.mark.asyncio
REPO = Path(__file__).resolve().parents[2]

BAD_RESULTS = {
    "unreadable": b"{not json",
    "deep": b"[" * 100_000,  # json.loads recurses past the stack
    "not-an-object": b"5",
    "bad-exit-code": b'{"exit_code": "zero"}',
    "bad-error": b'{"error": 5}',
    "too-big": json.dumps({"exit_code": 0, "pad": "x" * (agentlink.MAX_JSON + 1)}).encode(),
}


# -- the hostile agent (runs in its own process) -----------------------------------------
def hostile_agent_main() -> None:
    print("ready", flush=True)  # imports done: the host may start the box (its wait for the socket is bounded)
    asyncio.run(_hostile_agent(Path(sys.argv[1]), sys.argv[2]))


async def _hostile_agent(box_dir: Path, hello: str) -> None:
    # The backend clears the box's sockets and then writes vm.json: listen only after that.
    while not (box_dir / "vm.json").exists():
        await asyncio.sleep(0.01)
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await _speak(reader, writer, hello)
        done.set()

    async with await asyncio.start_unix_server(serve, path=str(box_dir / "agent.sock")):
        await done.wait()


async def _speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: str) -> None:
    if hello == "malformed":
        for bad in (b"{not json", b"[" * 100_000, b'"a string"', b"x" * P.MAX_PAYLOAD):
            writer.write(P.pack(0, P.HELLO, bad))
        writer.write(P.pack(0, 99, b"?") + P.pack(4242, P.STDOUT, b"stray") + P.pack(4242, P.RESULT, b"{}"))
    writer.write(P.pack_json(0, P.HELLO, {"version": 1, "uptime": "soon" if hello == "malformed" else 0.5}))
    decoder = P.Decoder()
    tasks: set[asyncio.Task[None]] = set()
    inbox: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}  # what the host sends on each channel
    while data := await reader.read(1 << 20):
        for gid, ftype, payload in decoder.feed(data):
            if ftype == P.OPEN:
                inbox[gid] = asyncio.Queue()
                task = asyncio.create_task(_answer(writer, gid, json.loads(payload), hello, inbox[gid]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif gid in inbox:
                inbox[gid].put_nowait((ftype, payload))


async def _answer(
    writer: asyncio.StreamWriter,
    gid: int,
    req: dict[str, object],
    mode: str = "plain",
    inbox: asyncio.Queue[tuple[int, bytes]] | None = None,
) -> None:
    if req.get("op") != "exec" and mode == "chatty":  # output on a request that has none, never a result
        writer.write(P.pack(gid, P.STDOUT, b"x"))
        return
    if req.get("op") == "put" and str(req.get("path")).endswith("stdout"):  # a byte nobody reads, then nothing
        writer.write(P.pack(gid, P.STDOUT, b"x"))
        return
    if req.get("op") == "put" and inbox is not None:  # a byte of stderr at once, then a flood of it
        writer.write(P.pack(gid, P.STDERR, b"\xff"))
        while (frame := await inbox.get())[0] != P.EOF:
            if frame[0] == P.STDIN:
                writer.write(P.pack_credit(gid, len(frame[1])))
        junk = b"\xff\x1b]0;owned\x07" * 4000  # 60 KB: not UTF-8, with terminal escapes
        writer.write(P.pack(gid, P.STDERR, junk) + P.pack_json(gid, P.RESULT, {"exit_code": 1}))
        await writer.drain()
        return
    if req.get("op") != "exec":
        writer.write(P.pack_json(gid, P.RESULT, {"ok": True, "ns": time.time_ns()}))  # clock, shutdown, ...
        return
    what, *args = req["argv"]  # type: ignore[misc]
    if what == "echo":
        writer.write(P.pack(gid, P.STDOUT, args[0].encode()) + P.pack_json(gid, P.RESULT, {"exit_code": 0}))
    elif what == "flood":  # output with no regard for credit
        total, size = int(args[0]), int(args[1])
        batch = P.pack(gid, P.STDOUT, b"x" * size) * max(1, (1 << 20) // (size + P.HEADER.size))
        sent = 0
        while sent < total:
            writer.write(batch)
            sent += len(batch) // (size + P.HEADER.size) * size
            await writer.drain()
        writer.write(P.pack_json(gid, P.RESULT, {"exit_code": 0}))
    elif what == "oversized":
        writer.write(P.HEADER.pack(P.MAX_PAYLOAD + 1, gid, P.STDOUT) + b"x" * 4096)
    elif what == "result":
        writer.write(P.pack(gid, P.RESULT, BAD_RESULTS[args[0]]))
    elif what == "credit":  # credit for input the host never sent
        writer.write(P.pack_credit(gid, 1 << 20))
    # "silent": never answers
    await writer.drain()


# -- the host side -----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def hostile_box(
    rt: boxvm.Runtime, monkeypatch: pytest.MonkeyPatch, hello: str = "plain"
) -> AsyncIterator[tuple[boxvm.Box, int]]:
    """A started box whose agent is the hostile one: (box, supervisor pid)."""
    real_argv = qemu.argv

    def argv(spec: qemu.VmSpec, accel: object) -> list[str]:
        args = real_argv(spec, accel)  # type: ignore[arg-type]
        port, unused = f"path={spec.box_dir / 'agent.sock'},", f"path={spec.box_dir / 'unused.sock'},"
        moved = [a.replace(port, unused) for a in args]
        assert moved != args
        return [*moved, "-S"]

    box = await rt.create(boxvm.BoxOptions(warm=False), name=f"hostile-{os.urandom(3).hex()}")  # a boot, held by -S
    box_dir = rt.backend.home.box_dir(box.id)  # type: ignore[attr-defined]
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from tests.vm.test_security_guest import hostile_agent_main; hostile_agent_main()",
        str(box_dir), hello, cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert agent.stdout is not None and await asyncio.wait_for(agent.stdout.readline(), 120) == b"ready\n"
        with monkeypatch.context() as m:
            m.setattr(qemu, "argv", argv)
            if hello == "chatty":  # the caller checks how the start fails
                yield box, 0
                return
            await asyncio.wait_for(box.start(), 60)
        yield box, rt.backend.store.get_box(box.id).supervisor_pid  # type: ignore[attr-defined]
    finally:
        with contextlib.suppress(ProcessLookupError):
            agent.kill()
        await agent.wait()
        await rt.remove(box.id, force=True)


async def _peak_rss(pids: list[int | str], stop: asyncio.Event) -> float:
    """Peak summed RSS (MiB) of ``pids`` until ``stop`` is set."""
    peak = 0.0
    while not stop.is_set():
        with contextlib.suppress(OSError, AssertionError):
            peak = max(peak, sum(rss_mib(pid) for pid in pids))
        await asyncio.sleep(0.02)
    return peak


async def test_credit_ignoring_flood_is_cut_off(
    rt: boxvm.Runtime, shared_box: boxvm.Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hostile_box(rt, monkeypatch) as (box, supervisor):
        pids: list[int | str] = ["self", supervisor]
        base = sum(rss_mib(pid) for pid in pids)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_peak_rss(pids, stop))
        t0 = time.monotonic()
        # Nobody reads these outputs, so the host never returns credit: 512 MiB in 64 KiB
        # frames, and a window and a bit in 1-byte frames (the window counts those too).
        big = await box.spawn(["flood", str(512 << 20), str(64 << 10)])
        tiny = await box.spawn(["flood", str(P.WINDOW + (P.WINDOW >> 2)), "1"])
        # Meanwhile a real box is used as usual.
        other = asyncio.create_task(shared_box.exec(["sh", "-c", "head -c 3000000 /dev/zero | wc -c"]))
        for proc in (big, tiny):
            with pytest.raises(boxvm.EngineError, match=r"broke the protocol.*flow-control window"):
                await asyncio.wait_for(proc.wait(), 30)
        # The hostile box's other channels still work once its flood is through.
        assert (await asyncio.wait_for(box.exec(["echo", "still here"]), 60)).stdout == b"still here"
        assert (await asyncio.wait_for(other, 60)).stdout == b"3000000\n"
        elapsed = time.monotonic() - t0
        stop.set()
        growth = await sampler - base
    assert growth < 100, f"host RSS grew {growth:.0f} MiB during a 512 MiB flood"
    assert elapsed < 60


async def test_oversized_frame_fails_pending_and_later_calls_fast(
    rt: boxvm.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hostile_box(rt, monkeypatch) as (box, _supervisor):
        pending = await box.spawn(["silent"])
        await asyncio.sleep(0.2)  # its OPEN has reached the agent
        t0 = time.monotonic()
        with pytest.raises(boxvm.EngineError, match="broke the protocol"):
            await asyncio.wait_for(box.exec(["oversized"]), 10)
        with pytest.raises(boxvm.EngineError, match="broke the protocol"):
            await asyncio.wait_for(pending.wait(), 5)
        with pytest.raises(boxvm.EngineError, match="broke the protocol"):
            await asyncio.wait_for(box.exec(["echo", "hello?"]), 5)
        assert time.monotonic() - t0 < 5
        info = await box.info()
        assert info.status == BoxStatus.RUNNING and "broke the protocol" in (info.error or "")
        # stop does not need the agent (QMP), and a restart would give a fresh connection
        info = await asyncio.wait_for(box.stop(timeout=5), 30)
        assert info.status == BoxStatus.STOPPED and info.error is None


async def test_malformed_frames_fail_only_their_request(rt: boxvm.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unreadable, nested, non-object and oversized HELLOs, an unknown frame type and frames
    # for a channel nobody opened come first: the box still starts on the valid HELLO.
    async with hostile_box(rt, monkeypatch, hello="malformed") as (box, _supervisor):
        assert (await box.info()).status == BoxStatus.RUNNING
        for name in BAD_RESULTS:
            with pytest.raises(boxvm.EngineError, match=r"guest agent sent (an unreadable|a malformed|a result with)"):
                await asyncio.wait_for(box.exec(["result", name]), 10)
        with pytest.raises(boxvm.EngineError, match="broke the protocol: it returned credit"):
            await asyncio.wait_for(box.exec(["credit"]), 10)
        assert (await asyncio.wait_for(box.exec(["echo", "fine"]), 10)).stdout == b"fine"


async def test_output_on_a_quick_request_does_not_hold_off_its_deadline(
    rt: boxvm.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start's clock request answered with one byte of output and no result: unread
    output used to suspend the request's deadline, so the start hung for ever."""
    async with hostile_box(rt, monkeypatch, hello="chatty") as (box, _none):
        t0 = time.monotonic()
        with pytest.raises(boxvm.EngineError, match="sent output for 'clock'"):
            await asyncio.wait_for(box.start(), 60)
        assert time.monotonic() - t0 < 20  # the agent's HELLO comes at once; no deadline is waited for


async def test_silent_guest_is_given_up_on(rt: boxvm.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    async with hostile_box(rt, monkeypatch) as (box, _supervisor):
        t0 = time.monotonic()
        with pytest.raises(boxvm.EngineError, match="did not report the end of the command"):
            await asyncio.wait_for(box.exec(["silent"], timeout=1), 30)
        elapsed = time.monotonic() - t0
        assert 1 + agentlink.EXEC_GRACE - 1 < elapsed < 1 + agentlink.EXEC_GRACE + 5
        assert (await asyncio.wait_for(box.exec(["echo", "next"]), 10)).stdout == b"next"


async def test_console_log_is_capped(rt: boxvm.Runtime, cold_box: boxvm.Box, monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 256 << 10
    monkeypatch.setenv("BOXVM_CONSOLE_LOG_BYTES", str(cap))  # read by the supervisor at start
    await cold_box.start()
    assert "starting agent" in await cold_box.logs()  # booted, not resumed from a template
    # A real guest writes 3 caps' worth straight to its serial port.
    flood = "head -c 800000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo END > /dev/ttyS0"
    assert (await cold_box.exec(["sh", "-c", flood], timeout=120)).exit_code == 0
    box_dir = rt.backend.home.box_dir(cold_box.id)  # type: ignore[attr-defined]
    log, rotated = box_dir / "console.log", box_dir / "console.log.1"
    for _ in range(600):  # the exec ends when the guest's tty has the bytes, not when its UART sent them
        if console.tail(log, 16).rstrip().endswith("xEND"):
            break
        await asyncio.sleep(0.1)
    assert log.stat().st_size <= cap and rotated.stat().st_size == cap
    text = await cold_box.logs()
    assert len(text) <= 2 * cap and text.rstrip().endswith("xEND")
    assert "starting agent" not in text  # the boot messages were rotated out
    assert len(console.tail(log, 1000)) == 1000  # readers take only the tail
    assert (await cold_box.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_what_a_copy_says_on_stderr_is_read_along_and_bounded(
    rt: boxvm.Runtime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The guest's side of a copy in says one byte on stderr at once (unread, it would keep
    the channel from ever timing out), then fails with 60 KB of it, not UTF-8 and full of
    terminal escapes: the error quotes a few KB of it, printable (a UnicodeDecodeError, and
    all of it buffered, before)."""
    (tmp_path / "f").write_bytes(os.urandom(3 << 20))  # more than the flow-control window
    async with hostile_box(rt, monkeypatch) as (box, _supervisor):
        with pytest.raises(boxvm.NotFound) as failed:
            await asyncio.wait_for(box.copy_in(tmp_path / "f", "/root/f"), 60)
        assert len(failed.value.message) < 4500 and "\x1b" not in failed.value.message
        # A byte on a copy in's stdout, which nobody reads, then silence: it would have kept
        # the copy from ever timing out; it breaks the protocol.
        with pytest.raises(boxvm.EngineError, match="sent output for 'put'"):
            await asyncio.wait_for(box.copy_in(tmp_path / "f", "/root/stdout"), 30)
        assert (await asyncio.wait_for(box.exec(["echo", "fine"]), 10)).stdout == b"fine"


async def test_qemu_runs_in_its_seccomp_sandbox(rt: boxvm.Runtime, shared_box: boxvm.Box) -> None:
    """A QEMU taken over through its device models, by the guest or by an imported device
    state (a REST upload's memory state is QEMU's migration stream), cannot run a program:
    QEMU runs under its seccomp filter (``-sandbox spawn=deny``, and no privilege or
    scheduling changes), and a suspended box still resumes (its state is handed over as a
    descriptor, not read through ``exec:cat``)."""
    qemu_pid = rt.backend.store.get_box(shared_box.id).qemu_pid  # type: ignore[attr-defined,union-attr]
    status = Path(f"/proc/{qemu_pid}/status").read_text()
    assert "\nSeccomp:\t2\n" in status, status  # 2: a filter
    await shared_box.exec(["sh", "-c", "echo before > /tmp/kept"])
    await shared_box.suspend()
    await shared_box.start()
    assert (await shared_box.exec(["cat", "/tmp/kept"])).stdout == b"before\n"
    qemu_pid = rt.backend.store.get_box(shared_box.id).qemu_pid  # type: ignore[attr-defined,union-attr]
    assert "\nSeccomp:\t2\n" in Path(f"/proc/{qemu_pid}/status").read_text()


async def test_a_qemu_without_seccomp_is_told_apart(home: Home, tmp_path: Path) -> None:
    """A QEMU built without libseccomp refuses ``-sandbox``: the probe says so (and its
    boxes start without it, with a warning) rather than no box starting at all."""
    real = qemucaps.qemu_binary()
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a; do shift; [ "$a" = -sandbox ] && a=-no-such-sandbox; set -- "$@" "$a"; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    assert not qemucaps.probe(home.cache, str(wrapper)).sandbox
    assert qemucaps.probe(home.cache, real).sandbox


def _qemu_wrapper(bindir: Path, body: str) -> Path:
    """A ``qemu-system-x86_64`` first on PATH that runs ``body`` (with ``$d``: the box
    directory, taken from the QMP socket's argument; empty in a probe), then the real QEMU."""
    real = qemucaps.qemu_binary()
    bindir.mkdir(parents=True)
    wrapper = bindir / "qemu-system-x86_64"
    wrapper.write_text(
        "#!/bin/sh\n"
        'd=""; for a; do case "$a" in unix:*/qmp.sock,*) d=${a#unix:}; d=${d%/qmp.sock,*};; esac; done\n'
        f"{body}\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


async def test_qemu_reaches_only_its_own_files(
    rt: boxvm.Runtime, home: Home, fresh_box: boxvm.Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QEMU taken over runs as the user that runs boxvm: Landlock keeps it to its own box
    directory's files, the files of its disks' chains (read-only) and the system's programs.
    The box's QEMU process itself (a wrapper that execs the real QEMU, under the same
    ruleset) tries what a taken-over QEMU would: the home's database, another box's files,
    the user's own files, writing its base disks, planting a link or removing a file in its
    directory, its supervisor's environment, signalling its supervisor."""
    secret = tmp_path / "outside" / "credentials"  # outside the wrapper's prefix (tmp_path/qemu)
    secret.parent.mkdir()
    secret.write_text("aws_secret_access_key = x\n")
    other = await rt.create(name=f"other-{os.urandom(2).hex()}")
    try:
        box_dir, other_dir = home.box_dir(fresh_box.id), home.box_dir(other.id)
        bases = [p for top in (TOP, GUEST_TOP) for p in qcow2.chain(box_dir / top)[1:]]
        assert bases  # the image's base disk and the guest's root file system, at least
        checks = {
            "db": f"cat {home.db}",
            "secret": f"cat {secret}",
            "other-box": f"cat {other_dir}/{GUEST_TOP}",
            "layers": f"ls {home.root}/layers/all",
            "base-written": " || ".join(f"echo >> {p}" for p in bases),
            "planted-link": f"ln -s {secret} $d/supervisor.log.1",  # for boxvm, unconfined, to follow
            "removed": "rm $d/vm.json",
            "records": "cat $d/vm.json",  # nothing of its box's but its disks, RAM and live/
            "sockets-listed": "cat /proc/$$/net/unix",  # every box's id is in its socket paths
            "environ": "cat /proc/$PPID/environ",  # its supervisor's: the caller's tokens and keys
            **({"signal": "kill -0 $PPID"} if confine.abi() >= 6 else {}),
        }
        body = 'if [ -n "$d" ]; then\n'
        for name, script in checks.items():
            body += f'  ( {script} ) >/dev/null 2>&1 && echo "{name} reached" >> "$d/live/probe.out"\n'
        body += f'  cat {" ".join(map(str, bases))} >/dev/null && echo bases read >> "$d/live/probe.out"\n'
        body += '  echo own > "$d/live/own" && cat "$d/live/own" >> "$d/live/probe.out"\nfi'
        monkeypatch.setenv("PATH", f"{_qemu_wrapper(tmp_path / 'qemu' / 'bin', body).parent}:{os.environ['PATH']}")
        (box_dir / "live").mkdir()
        for name in ("probe.out", "own"):  # (a QEMU makes no file in its directory: boxvm makes them)
            (box_dir / "live" / name).touch()
        await fresh_box.start()
        assert (await fresh_box.exec(["echo", "up"])).stdout == b"up\n"
        assert (box_dir / "live" / "probe.out").read_text() == "bases read\nown\n"
        assert "QEMU confined to its box" in (box_dir / "supervisor.log").read_text()
    finally:
        await rt.remove(other.id, force=True)


async def test_a_qemu_that_needs_other_files_runs_unconfined(home: Home, tmp_path: Path) -> None:
    """Where a QEMU needs files the ruleset does not grant (a build that keeps its firmware
    elsewhere), the probe says so, and its boxes start unconfined (with a warning) rather
    than not at all."""
    elsewhere = tmp_path / "elsewhere" / "bios.bin"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"\0")
    wrapper = _qemu_wrapper(tmp_path / "qemu" / "bin", f"cat {elsewhere} >/dev/null || exit 1")
    assert not qemucaps.probe(home.cache, str(wrapper)).confined
    assert qemucaps.probe(home.cache, qemucaps.qemu_binary()).confined


async def test_boxvms_sockets_turn_a_qemu_away(home: Home, shared_box: boxvm.Box, tmp_path: Path) -> None:
    """Landlock does not stop a QEMU from connecting to its user's unix sockets: another
    box's ``ctl.sock`` (whose supervisor runs commands in its guest) and the zygote's (which
    starts supervisors) refuse a peer whose executable is a QEMU. The same Python under
    another name is served."""
    fake = tmp_path / "qemu-system-x86_64"
    shutil.copy(os.path.realpath(sys.executable), fake)
    ctl = home.box_dir(shared_box.id) / "ctl.sock"
    zsock = zygote.socket_path(home.root, zygote.fingerprint())
    assert zygote._ensure_zygote(home.root, zsock)  # (one that an earlier test started may have gone idle)
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.settimeout(3)\n"
        "try:\n"
        "    s.sendall(sys.argv[2].encode())\n"
        "    print('answered' if s.recv(64) else 'closed')\n"
        "except TimeoutError:\n"
        "    print('open')\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print('closed')\n"
    )
    env = {"PYTHONHOME": sys.base_prefix, "PATH": os.environ["PATH"]}
    request = json.dumps({"box_dir": str(home.box_dir(shared_box.id)), "cwd": "/", "umask": 0o22, "env": {}}) + "\n"

    async def peer(python: str, path: Path, data: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            python, "-S", "-c", script, str(path), data, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        return out.decode().strip() or err.decode()[-300:]

    assert await peer(str(fake), ctl, "") == "closed"
    assert await peer(sys.executable, ctl, "") == "open"  # a client is served (it waits for requests)
    assert await peer(str(fake), zsock, request) == "closed"  # no supervisor started
    assert (await shared_box.exec(["echo", "still"])).stdout == b"still\n"


async def test_an_unconfined_qemu_captures_and_saves_as_a_confined_one(
    rt: boxvm.Runtime, home: Home, fresh_box: boxvm.Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose kernel has no Landlock runs QEMU unconfined: the same files (later tops
    and saved devices go through ``live/``), with nothing confinement-only on the way."""
    monkeypatch.setattr(LocalBackend, "_confined", lambda self: False)
    await fresh_box.start()  # warm: its RAM is private, so a memory snapshot saves its devices by path
    await fresh_box.exec(["sh", "-c", "echo kept > /root/kept"])
    await fresh_box.snapshot.create("disk")
    await fresh_box.snapshot.create("memory", boxvm.SnapshotOptions(memory=True))
    assert (await fresh_box.exec(["cat", "/root/kept"])).stdout == b"kept\n"
    assert "confined" not in (home.box_dir(fresh_box.id) / "supervisor.log").read_text()
