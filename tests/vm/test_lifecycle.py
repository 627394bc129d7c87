"""Box lifecycle with real VMs: start, stop, restart, persistence, failure, removal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import boxvm
from boxvm import BoxStatus
from boxvm.backends.local import LocalBackend
from tests.helpers import pid_alive, processes_of

pytestmark = [pytest.mark.asyncio, pytest.mark.backends("local", "remote")]


async def test_create_start_exec_stop_start_keeps_data(
    rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend
) -> None:
    assert (await fresh_box.info()).status == BoxStatus.CONFIGURED
    info = await fresh_box.start()
    assert info.status == BoxStatus.RUNNING
    assert info.timings["boot_ms"] > 0 and info.started_at is not None
    r = await fresh_box.exec(["sh", "-c", "echo hi > /root/note; cat /root/note"])
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"hi\n", b"")
    stopped = await fresh_box.stop()
    assert stopped.status == BoxStatus.STOPPED
    assert "stop_ms" in stopped.timings
    assert not (local.home.box_dir(fresh_box.id) / "ctl.sock").exists()
    await fresh_box.start()
    r = await fresh_box.exec(["cat", "/root/note"])
    assert r.stdout == b"hi\n"
    # identity: the hostname is the box name, networking is up
    r = await fresh_box.exec(["sh", "-c", "cat /etc/hostname; ip -o addr show eth0 | grep -c 10.0.2.15"])
    assert r.stdout.decode().split() == [fresh_box.name, "1"]


async def test_remove_leaves_no_process_socket_or_file(rt: boxvm.Runtime, local: LocalBackend) -> None:
    box = await rt.create(name="t-remove-clean")
    await box.start()
    box_dir = local.home.box_dir(box.id)
    assert (box_dir / "ctl.sock").exists() and processes_of(box.id)
    with pytest.raises(boxvm.InvalidState, match="stop it first or pass force=True"):
        await rt.remove(box.id)
    await rt.remove(box.id, force=True)
    assert await rt.get(box.id) is None
    assert not box_dir.exists()
    for _ in range(50):
        if not processes_of(box.id):
            break
        await asyncio.sleep(0.1)
    assert processes_of(box.id) == []


async def test_qemu_killed_is_not_running_forever(rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend) -> None:
    await fresh_box.start()
    rec = local.store.get_box(fresh_box.id)
    assert rec.qemu_pid and pid_alive(rec.qemu_pid)
    os.kill(rec.qemu_pid, signal.SIGKILL)
    for _ in range(100):
        info = await fresh_box.info()
        if info.status != BoxStatus.RUNNING:
            break
        await asyncio.sleep(0.1)
    assert info.status == BoxStatus.FAILED
    assert "signal 9" in (info.error or "")
    with pytest.raises(boxvm.InvalidState, match="start it first"):
        await fresh_box.exec(["true"])
    # a failed box can be started again and still has its disk
    await fresh_box.start()
    assert (await fresh_box.exec(["true"])).exit_code == 0


async def test_supervisor_killed_stops_the_vm_and_marks_failed(
    rt: boxvm.Runtime, fresh_box: boxvm.Box, local: LocalBackend
) -> None:
    await fresh_box.start()
    rec = local.store.get_box(fresh_box.id)
    os.kill(rec.supervisor_pid, signal.SIGKILL)
    for _ in range(100):  # QEMU dies with its parent (PDEATHSIG)
        if not pid_alive(rec.qemu_pid):
            break
        await asyncio.sleep(0.1)
    assert not pid_alive(rec.qemu_pid)
    info = await fresh_box.info()
    assert info.status == BoxStatus.FAILED and "supervisor" in (info.error or "")


async def test_box_used_from_a_second_process(
    rt: boxvm.Runtime, shared_box: boxvm.Box, home: object, local: LocalBackend
) -> None:
    await shared_box.exec(["sh", "-c", "echo from-first > /tmp/handoff"])
    script = textwrap.dedent(
        f"""
        import boxvm.sync as bs
        rt = bs.Runtime({str(local.home.root)!r})
        box = rt.get({shared_box.name!r})
        print(box.info().status)
        r = box.exec(["sh", "-c", "cat /tmp/handoff; echo from-second > /tmp/handback"])
        print(r.stdout.decode().strip())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["running", "from-first"]
    assert (await shared_box.exec(["cat", "/tmp/handback"])).stdout == b"from-second\n"


async def test_pause_and_resume(shared_box: boxvm.Box) -> None:
    proc = await shared_box.spawn(["sh", "-c", "sleep 1; echo done"])
    info = await shared_box.pause()
    assert info.status == BoxStatus.PAUSED
    with pytest.raises(boxvm.InvalidState):
        await shared_box.exec(["true"])
    await asyncio.sleep(1.5)  # paused: the guest's clock does not advance
    await shared_box.resume()
    assert await proc.wait() == 0
    assert (await shared_box.info()).status == BoxStatus.RUNNING


async def test_ports_forward_to_the_guest(rt: boxvm.Runtime) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box = await rt.create(boxvm.BoxOptions(ports=[(port, 8000)]), name="t-ports")
    try:
        await box.start()
        server = await box.spawn(["python3", "-m", "http.server", "8000", "--directory", "/etc"])
        body = b""
        for _ in range(60):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /hostname HTTP/1.0\r\n\r\n")
                body = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                if body:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.5)
        assert body.endswith(b"t-ports\n"), body
        server.kill()
        await server.wait()
    finally:
        await rt.remove(box.id, force=True)


async def test_network_none_has_no_interface(rt: boxvm.Runtime) -> None:
    box = await rt.create(boxvm.BoxOptions(network="none"), name="t-nonet")
    try:
        await box.start()
        r = await box.exec(["sh", "-c", "ls /sys/class/net"])
        assert r.stdout.split() == [b"lo"]
    finally:
        await rt.remove(box.id, force=True)
