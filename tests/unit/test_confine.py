"""The Landlock ruleset of a box's QEMU (``engine/confine``), applied to plain processes:
what they may open, write, list and signal. ``tests/vm/test_security_guest.py`` checks that
a real box's QEMU runs under it."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from boxvm.engine import confine


def _run(policy: confine.Policy, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], preexec_fn=policy.enter, capture_output=True, text=True, timeout=30)


def test_this_kernel_has_landlock() -> None:
    """Boxes run confined only where the kernel has Landlock (5.13 and later, when enabled):
    the suite's hosts must, or nothing here would be tested."""
    assert confine.abi() >= 1


def test_a_confined_process_reaches_its_box_and_what_it_is_granted_only(tmp_path: Path) -> None:
    box, other = tmp_path / "box", tmp_path / "other"
    (box / "live").mkdir(parents=True)
    other.mkdir()
    for name, text in (("disk.qcow2", "top\n"), ("memory.json", "{}"), ("live/.live-1.qcow2", "later\n")):
        (box / name).write_text(text)
    (other / "layer.qcow2").write_text("granted\n")
    (other / "secret").write_text("secret\n")
    (other / "secret").chmod(0o600)
    reads = [other / "layer.qcow2", other / "gone.qcow2"]
    policy = confine.for_qemu(box, reads, [box / "disk.qcow2"], "/usr/bin/qemu-system-x86_64")
    try:
        assert _run(policy, f"cat {other}/layer.qcow2").stdout == "granted\n"
        refused = [
            f"cat {other}/secret",  # a file beside a granted one
            f"echo x >> {other}/layer.qcow2",  # a granted file is read-only
            f"ls {other}",  # its directory cannot be listed
            f"echo x > {other}/new",
            f"ln {other}/layer.qcow2 {box}/live/link",  # nor linked into the box, to be written there
            # In its own directory: nothing boxvm, unconfined, reads, follows or trusts.
            f"cat {box}/memory.json",
            f"echo x >> {box}/memory.json",
            f"ln -s {Path.home()} {box}/qemu.log",
            f"mkfifo {box}/fifo",
            f"mkdir {box}/d",
            f"echo x > {box}/new",
            f"echo x > {box}/live/new",
            f"rm {box}/disk.qcow2",
            f"mv {box}/live/.live-1.qcow2 {box}/moved",
            f"cat /proc/{os.getpid()}/environ",  # another process's environment
            f"cat /proc/{os.getpid()}/cmdline",
            "cat /proc/$$/net/unix",  # its own: the path of every socket on the host
        ]
        for script in refused:
            done = _run(policy, script)
            assert done.returncode != 0, (script, done.stdout)
            assert any(why in done.stderr for why in ("ermission denied", "cross-device")), (script, done.stderr)
        later = box / "live/.live-1.qcow2"
        done = _run(policy, f"echo mine >> {box}/disk.qcow2 && echo also >> {later} && cat {box}/disk.qcow2")
        assert done.stdout == "top\nmine\n" and later.read_text() == "later\nalso\n"
        made = f"import socket; socket.socket(socket.AF_UNIX).bind('{box}/qmp.sock')"  # its sockets
        assert _run(policy, f'/usr/bin/python3 -S -c "{made}"').returncode == 0 and (box / "qmp.sock").exists()
        done = _run(policy, "ls /usr/bin >/dev/null && head -c 5 /proc/$$/status && cat /etc/ld.so.cache >/dev/null")
        assert done.stdout == "Name:", done.stderr
        if policy.abi >= 6:  # scoped: its supervisor and other boxes' QEMUs, and abstract sockets made outside
            done = _run(policy, f"kill -0 {os.getpid()}")
            assert done.returncode != 0 and "not permitted" in done.stderr
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(b"\0boxvm-test-" + os.urandom(4).hex().encode())
                listener.listen()
                name = listener.getsockname()[1:].decode()
                reach = f"import socket; socket.socket(socket.AF_UNIX).connect(b'\\0{name}')"
                assert _run(policy, f'/usr/bin/python3 -S -c "{reach}"').returncode != 0
    finally:
        policy.close()
    assert (other / "layer.qcow2").read_text() == "granted\n" and (box / "memory.json").read_text() == "{}"
    assert sorted(p.name for p in box.iterdir()) == ["disk.qcow2", "live", "memory.json", "qmp.sock"]
    assert not (other / "new").exists()


def test_a_box_directory_that_is_gone_is_an_error(tmp_path: Path) -> None:
    try:
        confine.for_qemu(tmp_path / "gone", [], [], "/usr/bin/qemu-system-x86_64")
    except FileNotFoundError:
        return
    raise AssertionError("a ruleset without its box directory was made")
