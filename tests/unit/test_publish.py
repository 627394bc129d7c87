"""Files published under a user-chosen name: all or nothing, never over another file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from boxvm import publish
from boxvm.errors import AlreadyExists


def test_written_file_appears_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with publish.exclusive_file(dest) as out:
        out.write(b"x" * 100_000)
        assert not dest.exists() and os.listdir(tmp_path) == []  # unnamed while written
    assert dest.read_bytes() == b"x" * 100_000


def test_a_file_created_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(AlreadyExists), publish.exclusive_file(dest) as out:
        out.write(b"mine")
        dest.write_bytes(b"theirs")
    assert dest.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_error_in_the_writer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), publish.exclusive_file(tmp_path / "out.bin") as out:
        out.write(b"half")
        raise RuntimeError("the producer failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("named", [False, True])
def test_a_killed_writer_leaves_nothing_after_recovery(tmp_path: Path, named: bool) -> None:
    """SIGKILL mid-write: with O_TMPFILE nothing is ever visible; with the named fallback
    (filesystems without O_TMPFILE) the journal lets recovery delete the partial file."""
    dest, journal = tmp_path / "dest" / "out.bin", tmp_path / "journal"
    dest.parent.mkdir()
    journal.mkdir()
    # Without O_DIRECTORY the flag opens the directory for writing: EISDIR, as on kernels without O_TMPFILE.
    force = "os.O_TMPFILE &= ~os.O_DIRECTORY\n" if named else ""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from boxvm import publish
        {force}
        with publish.exclusive_file(Path({str(dest)!r}), Path({str(journal)!r})) as out:
            out.write(b"half" * 1000)
            out.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = os.listdir(dest.parent)
    assert ("out.bin" not in left) and (bool(left) == named)  # the named fallback left its partial file
    publish.recover(journal, lambda pid: False)
    assert os.listdir(dest.parent) == [] and os.listdir(journal) == []
