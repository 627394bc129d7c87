"""What a failed start quotes of the guest's console: the agent is PID 1, so its death is a
kernel panic whose trace alone would fill the tail."""

from __future__ import annotations

from pathlib import Path

from boxvm.backends.local import _tail


def test_a_failed_start_quotes_the_agents_traceback_and_the_panic(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    lines = ["[    0.5] boot noise"] * 50 + ["boxvm: starting agent"] + ["[    1.0] more noise"] * 10
    lines += ["Traceback (most recent call last):"]
    for i in range(6):  # deep enough that its head and its exception line are 19 lines apart
        lines += [f'  File "/opt/boxvm/agent.py", line {i}, in f{i}', "    f()", "    ^^^"]
    lines += ["ValueError: frame too big"]
    lines += ["[    4.9] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"]
    lines += ["[    4.9] CPU: 0 PID: 1 Comm: python3.11 Not tainted 6.1.0-28-cloud-amd64 #1 Debian"]
    lines += [f"[    4.9]  trace line {i}" for i in range(30)]
    console.write_text("\n".join(lines) + "\n")
    tail = _tail(console).splitlines()
    assert "boxvm: starting agent" in tail and "ValueError: frame too big" in tail
    assert tail.index("Traceback (most recent call last):") < tail.index("ValueError: frame too big")
    assert "Kernel panic" in tail[-2] and "Comm: python3.11" in tail[-1]  # who died; not the trace
    assert len(tail) <= 5 + 12 + 2


def test_a_panic_quotes_what_pid_1_said_before_it(tmp_path: Path) -> None:
    """An init that dies before the agent runs says why on the console, unmarked (busybox's
    switch_root, say): the lines just before the panic are quoted, not its trace."""
    console = tmp_path / "console.log"
    lines = ["[    0.5] boot noise"] * 50 + ["switch_root: can't execute '/sbin/boxvm-init': Input/output error"]
    lines += ["[    1.9] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"]
    lines += ["[    1.9] CPU: 0 PID: 1 Comm: switch_root Not tainted"]
    lines += [f"[    1.9]  trace line {i}" for i in range(40)]
    console.write_text("\n".join(lines) + "\n")
    tail = _tail(console).splitlines()
    assert tail[-3:-1] == lines[50:52] and "Comm: switch_root" in tail[-1]
    assert not any("trace line" in line for line in tail) and len(tail) == 8 + 2


def test_without_a_panic_the_last_lines_are_quoted(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("\n".join(["boxvm: starting agent"] + [f"line {i}" for i in range(40)]) + "\n")
    tail = _tail(console).splitlines()
    assert tail == ["boxvm: starting agent"] + [f"line {i}" for i in range(25, 40)]
    assert _tail(tmp_path / "missing.log") == ""


def test_the_quote_is_bounded_and_printable(tmp_path: Path) -> None:
    """A guest writes one 4 MiB line with terminal escapes to its console: the quote (stored
    as the box's error and listed with it) stays a few KB, with no control characters."""
    console = tmp_path / "console.log"
    console.write_text("boxvm: \x1b]0;owned\x07" + "A" * (4 << 20) + "\nlast \x1b[2J line\n")
    tail = _tail(console)
    assert len(tail) < 8000 and "\x1b" not in tail and "\x07" not in tail
    assert tail.endswith("last ?[2J line")
