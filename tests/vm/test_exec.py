"""Exec semantics in a running VM: streams, codes, stdin, env, cwd, user, timeout, kill."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

import boxvm
from boxvm.backends.local import LocalBackend
from tests.helpers import rss_mib

pytestmark = [pytest.mark.asyncio, pytest.mark.backends("local", "remote")]


async def test_exit_code_stdout_stderr(shared_box: boxvm.Box) -> None:
    r = await shared_box.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (7, b"out\n", b"err\n", False)


async def test_missing_command_is_127(shared_box: boxvm.Box) -> None:
    r = await shared_box.exec(["no-such-command"])
    assert r.exit_code == 127 and b"not found" in r.stderr


async def test_stdin_is_delivered(shared_box: boxvm.Box) -> None:
    payload = os.urandom(3 << 20)  # bigger than the flow-control window
    r = await shared_box.exec(["sha256sum"], stdin=payload)
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


async def test_env_cwd_and_user(shared_box: boxvm.Box) -> None:
    r = await shared_box.exec(
        ["sh", "-c", "echo $GREETING; pwd; id -u; echo $HOME"], env={"GREETING": "hej"}, cwd="/tmp"
    )
    assert r.stdout.decode().split() == ["hej", "/tmp", "0", "/root"]
    r = await shared_box.exec(
        ["sh", "-c", "id -u; id -g; echo $HOME; touch /home/user/mine; ls -n /home/user/mine"], user="user"
    )
    lines = r.stdout.decode().split("\n")
    assert lines[:3] == ["1000", "1000", "/home/user"]
    assert lines[3].split()[2:4] == ["1000", "1000"]
    r = await shared_box.exec(["id", "-u"], user="1234")
    assert r.stdout == b"1234\n"
    with pytest.raises(boxvm.NotFound, match="nobody-here"):
        await shared_box.exec(["true"], user="nobody-here")
    r = await shared_box.exec(["true"], cwd="/no/such/dir")
    assert r.exit_code != 0 and b"/no/such/dir" in r.stderr


async def test_image_defaults_apply(shared_box: boxvm.Box) -> None:
    r = await shared_box.exec(["sh", "-c", "pwd; echo $LANG; echo $PATH"])
    assert r.stdout.decode().split() == [
        "/root",
        "C.UTF-8",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]


async def test_output_streams_before_the_command_ends(shared_box: boxvm.Box) -> None:
    t0 = time.monotonic()
    proc = await shared_box.spawn(["sh", "-c", "echo first; sleep 3; echo second"])
    arrivals = []
    async for chunk in proc.stdout:
        arrivals.append((time.monotonic() - t0, chunk))
    assert await proc.wait() == 0
    assert b"".join(c for _t, c in arrivals) == b"first\nsecond\n"
    assert arrivals[0][1] == b"first\n"
    assert arrivals[-1][0] - arrivals[0][0] > 2.5  # the first line came well before the end


async def test_timeout_kills_the_process_group(shared_box: boxvm.Box) -> None:
    t0 = time.monotonic()
    r = await shared_box.exec(["sh", "-c", "sleep 60 & sleep 60; echo never"], timeout=1.5)
    assert r.timed_out and r.exit_code == 137 and b"never" not in r.stdout
    assert time.monotonic() - t0 < 20


async def test_signal_and_kill(shared_box: boxvm.Box) -> None:
    proc = await shared_box.spawn(
        ["sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done"]
    )
    first = await proc.stdout.__anext__()
    assert first == b"ready\n"
    import signal

    proc.signal(signal.SIGTERM)
    rest = b"".join([c async for c in proc.stdout])
    assert await proc.wait() == 3 and b"got-term" in rest
    proc = await shared_box.spawn(["sleep", "60"])
    await asyncio.sleep(0.3)
    proc.kill()
    assert await proc.wait() == 137


async def test_four_concurrent_execs(shared_box: boxvm.Box) -> None:
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(shared_box.exec(["sh", "-c", f"sleep 2; echo {i}; echo e{i} >&2"]) for i in range(4))
    )
    elapsed = time.monotonic() - t0
    assert [(r.stdout, r.stderr) for r in results] == [(f"{i}\n".encode(), f"e{i}\n".encode()) for i in range(4)]
    assert elapsed < 6, f"4 x 2 s sleeps took {elapsed:.1f} s: execs did not run concurrently"


async def test_tty_exec(shared_box: boxvm.Box) -> None:
    proc = await shared_box.spawn(["sh", "-c", "tty; stty size"], tty=True, size=(33, 101))
    out = b"".join([c async for c in proc.stdout])
    assert await proc.wait() == 0
    assert b"/dev/pts/" in out and b"33 101" in out


async def test_tty_resize_reaches_the_process(shared_box: boxvm.Box) -> None:
    proc = await shared_box.spawn(["sh", "-c", "stty size; read x; stty size"], tty=True, size=(33, 101))
    out = b""
    async for chunk in proc.stdout:
        out += chunk
        if b"33 101" in out:
            break
    proc.resize(40, 120)
    await proc.write(b"go\n")  # after the resize, in order
    out += b"".join([c async for c in proc.stdout])
    assert await proc.wait() == 0
    assert out.index(b"33 101") < out.index(b"40 120")


async def test_huge_stdout_streams_in_bounded_memory(
    rt: boxvm.Runtime, shared_box: boxvm.Box, local: LocalBackend
) -> None:
    rec = local.store.get_box(shared_box.id)
    before, sup_before = rss_mib(), rss_mib(rec.supervisor_pid)
    proc = await shared_box.spawn(["dd", "if=/dev/zero", "bs=1M", "count=100"])
    total, peak, sup_peak = 0, before, sup_before
    async for chunk in proc.stdout:
        total += len(chunk)
        if total % (8 << 20) < len(chunk):
            peak, sup_peak = max(peak, rss_mib()), max(sup_peak, rss_mib(rec.supervisor_pid))
            await asyncio.sleep(0.05)  # a slow consumer: the guest must wait, not us buffer
    assert await proc.wait() == 0
    assert total == 100 << 20
    assert peak - before < 40, f"client grew {peak - before:.0f} MiB"
    assert sup_peak - sup_before < 40, f"supervisor grew {sup_peak - sup_before:.0f} MiB"


async def test_copy_tree_in_and_out_keeps_modes(shared_box: boxvm.Box, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "secret").write_bytes(os.urandom(200_000))
    (src / "sub" / "secret").chmod(0o600)
    (src / "sub" / "deeper" / "note").write_text("deep\n")
    (src / "sub" / "deeper").chmod(0o750)
    (src / "link").symlink_to("sub/deeper/note")
    await shared_box.exec(["rm", "-rf", "/root/copied"])
    await shared_box.exec(["mkdir", "/root/copied"])
    await shared_box.copy_in(src, "/root/copied")
    r = await shared_box.exec(
        [
            "sh",
            "-c",
            "cd /root/copied/tree && ./run.sh && stat -c '%a %n' run.sh sub/secret sub/deeper && readlink link",
        ]
    )
    assert r.stdout.decode().split("\n")[:5] == [
        "run",
        "755 run.sh",
        "600 sub/secret",
        "750 sub/deeper",
        "sub/deeper/note",
    ]
    back = tmp_path / "back"
    await shared_box.copy_out("/root/copied/tree", back)
    for rel in ("run.sh", "sub/secret", "sub/deeper/note"):
        assert (back / rel).read_bytes() == (src / rel).read_bytes()
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((back / "sub" / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((back / "sub" / "deeper").stat().st_mode) == 0o750
    assert os.readlink(back / "link") == "sub/deeper/note"
    # a single file to a new name
    await shared_box.copy_in(src / "run.sh", "/root/renamed.sh")
    assert (await shared_box.exec(["/root/renamed.sh"])).stdout == b"run\n"
    with pytest.raises(boxvm.NotFound):
        await shared_box.copy_out("/root/does-not-exist", tmp_path / "x")
