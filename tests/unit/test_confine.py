"""The Landlock ruleset of a box's QEMU (``engine/confine``), applied to plain processes:
what they may open, write, list and signal. ``tests/vm/test_security_guest.py`` checks that
a real box's QEMU runs under it."""

from __future__ import annotations

import os
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
    box.mkdir()
    other.mkdir()
    (box / "disk.qcow2").write_text("top\n")
    (other / "layer.qcow2").write_text("granted\n")
    (other / "secret").write_text("secret\n")
    (other / "secret").chmod(0o600)
    policy = confine.for_qemu(box, [other / "layer.qcow2", other / "gone.qcow2"], "/usr/bin/qemu-system-x86_64")
    try:
        assert _run(policy, f"cat {other}/layer.qcow2").stdout == "granted\n"
        refused = [
            f"cat {other}/secret",  # a file beside a granted one
            f"echo x >> {other}/layer.qcow2",  # a granted file is read-only
            f"ls {other}",  # its directory cannot be listed
            f"echo x > {other}/new",
            f"ln {other}/layer.qcow2 {box}/link",  # nor linked into the box, to be written there
            # In its own directory: nothing that boxvm, unconfined, could follow or trust.
            f"ln -s {Path.home()} {box}/qemu.log",
            f"mkfifo {box}/fifo",
            f"mkdir {box}/d",
            f"echo x > {box}/new",
            f"rm {box}/disk.qcow2",
            f"mv {box}/disk.qcow2 {box}/moved",
            f"cat /proc/{os.getpid()}/environ",  # another process's environment
            f"cat /proc/{os.getpid()}/cmdline",
        ]
        for script in refused:
            done = _run(policy, script)
            assert done.returncode != 0, (script, done.stdout)
            assert any(why in done.stderr for why in ("ermission denied", "cross-device")), (script, done.stderr)
        done = _run(policy, f"echo mine >> {box}/disk.qcow2 && cat {box}/disk.qcow2 && ls {box}")
        assert done.stdout == "top\nmine\ndisk.qcow2\n", done.stderr
        made = f"import socket; socket.socket(socket.AF_UNIX).bind('{box}/qmp.sock')"  # its sockets
        assert _run(policy, f'/usr/bin/python3 -S -c "{made}"').returncode == 0 and (box / "qmp.sock").exists()
        done = _run(policy, "ls /usr/bin >/dev/null && head -c 5 /proc/$$/status && cat /etc/ld.so.cache >/dev/null")
        assert done.stdout == "Name:", done.stderr
        if policy.abi >= 6:  # signals are scoped: its supervisor and other boxes' QEMUs are out of reach
            done = _run(policy, f"kill -0 {os.getpid()}")
            assert done.returncode != 0 and "not permitted" in done.stderr
    finally:
        policy.close()
    assert (other / "layer.qcow2").read_text() == "granted\n"
    assert sorted(p.name for p in box.iterdir()) == ["disk.qcow2", "qmp.sock"] and not (other / "new").exists()


def test_a_box_directory_that_is_gone_is_an_error(tmp_path: Path) -> None:
    try:
        confine.for_qemu(tmp_path / "gone", [], "/usr/bin/qemu-system-x86_64")
    except FileNotFoundError:
        return
    raise AssertionError("a ruleset without its box directory was made")
