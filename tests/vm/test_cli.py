"""The `boxvm` command line, run as a user would (a subprocess per command)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from boxvm.paths import Home


def boxvm(home: Home, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "BOXVM_HOME": str(home.root)}
    return subprocess.run(
        [sys.executable, "-c", "from boxvm.cli.main import main; main()", *args],
        capture_output=True, env=env, input=input, timeout=300,
    )  # fmt: skip


SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # rich's default spinner frames


def on_a_terminal(home: Home, *args: str) -> bytes:
    """What a user's terminal shows when they run ``boxvm ARGS`` in it (stdin, stdout and
    stderr on one pseudo-terminal)."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "BOXVM_HOME": str(home.root), "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from boxvm.cli.main import main; main()", *args],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(secondary)
    screen = b""
    with contextlib.suppress(OSError):  # EIO once the last writer is gone
        while chunk := os.read(primary, 4096):
            screen += chunk
    os.close(primary)
    assert proc.wait(timeout=120) == 0, screen
    return screen


def test_doctor(home: Home) -> None:
    r = boxvm(home, "doctor", "--json")
    checks = {c["check"]: c for c in json.loads(r.stdout)}
    # (the layer scan of this shared home may catch other workers' operations mid-way)
    assert all(c["ok"] for name, c in checks.items() if name != "layers"), r.stdout
    assert "layers" in checks
    assert checks["acceleration"]["detail"].startswith(("tcg", "kvm"))
    assert checks["guest bundle"]["ok"]


def test_run_rm_propagates_exit_code_and_output(home: Home) -> None:
    r = boxvm(
        home, "run", "--rm", "--name", "cli-run", "-e", "WHO=cli", "--", "sh", "-c", "echo $WHO; echo oops >&2; exit 5"
    )
    assert (r.returncode, r.stdout, r.stderr) == (5, b"cli\n", b"oops\n")
    assert b"cli-run" not in boxvm(home, "ls").stdout


def test_box_commands_end_to_end(home: Home, tmp_path: Path) -> None:
    name = "cli-e2e"
    assert boxvm(home, "create", "--name", name).returncode == 0
    try:
        assert boxvm(home, "start", name).returncode == 0
        listed = {b["name"]: b for b in json.loads(boxvm(home, "ls", "--json").stdout)}
        assert listed[name]["status"] == "running"
        r = boxvm(home, "exec", "-i", name, "sh", "-c", "cat > /root/in; wc -c < /root/in", input=b"12345")
        assert r.returncode == 0 and r.stdout.strip() == b"5"
        r = boxvm(home, "exec", "-t", name, "tty")
        assert r.stdout.startswith(b"/dev/pts/")
        assert boxvm(home, "exec", name, "false").returncode == 1
        r = boxvm(home, "exec", name, "--", "sh", "-c", "echo after-dashes")
        assert (r.returncode, r.stdout) == (0, b"after-dashes\n")
        r = boxvm(home, "exec", name, "--")
        assert r.returncode == 1 and b"no command given" in r.stderr
        screen = on_a_terminal(home, "exec", "-it", name, "sh", "-c", "sleep 1; echo typed-here")
        assert b"typed-here" in screen and not SPINNER & set(screen.decode(errors="replace")), screen
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "f").write_text("file\n")
        assert boxvm(home, "cp", str(tmp_path / "d"), f"{name}:/root/").returncode == 0
        assert boxvm(home, "cp", f"{name}:/root/d/f", str(tmp_path / "back")).returncode == 0
        assert (tmp_path / "back").read_text() == "file\n"
        info = json.loads(boxvm(home, "inspect", name).stdout)
        assert info["name"] == name and info["timings"]["boot_ms"] > 0
        # the console (a warm start, resumed from the template, printed no boot messages: those
        # of a cold boot are test_security_guest's)
        assert boxvm(home, "exec", name, "sh", "-c", "echo cli-console-mark > /dev/ttyS0").returncode == 0
        assert b"cli-console-mark" in boxvm(home, "logs", name).stdout
        r = boxvm(home, "rm", name)
        assert r.returncode == 1 and b"InvalidState" in r.stderr and b"force" in r.stderr
        assert boxvm(home, "stop", name).returncode == 0
        r = boxvm(home, "exec", name, "true")
        assert r.returncode == 1 and b"start it first" in r.stderr
    finally:
        boxvm(home, "rm", "-f", name)
    r = boxvm(home, "inspect", name)
    assert r.returncode == 1 and b"NotFound" in r.stderr


@pytest.mark.parametrize("args", [["start", "nope"], ["create", "--name", "bad/name"], ["run", "-p", "x:1", "true"]])
def test_errors_are_one_clear_line(home: Home, args: list[str]) -> None:
    r = boxvm(home, *args)
    assert r.returncode == 1
    assert r.stderr.decode().startswith("error (") and r.stderr.count(b"\n") == 1


def test_doctor_scans_layers_and_repairs(tmp_path: Path) -> None:
    """A layer file no record knows and no chain reaches is reported, and deleted by
    ``--repair``; a clean home reports that references match."""
    from boxvm.backends.local import LocalBackend
    from boxvm.disks import qcow2

    home = Home.default(tmp_path / "home")
    LocalBackend(home)  # creates the home and its store
    orphan = home.root / "layers" / "0123456789abcdef"
    orphan.mkdir(parents=True)
    qcow2.write_overlay(orphan / "layer.qcow2", 1 << 20, None)

    def layers_check(*args: str) -> tuple[int, dict[str, object]]:
        r = boxvm(home, "doctor", "--json", *args)
        return r.returncode, {c["check"]: c for c in json.loads(r.stdout)}["layers"]

    code, check = layers_check()
    assert code == 1 and not check["ok"] and "1 orphaned layers" in str(check["detail"]) and orphan.exists()
    code, check = layers_check("--repair")
    assert check["ok"] and "deleted 1" in str(check["detail"]) and not orphan.exists()
    _code, check = layers_check()
    assert check["ok"] and check["detail"] == "references match every chain"
