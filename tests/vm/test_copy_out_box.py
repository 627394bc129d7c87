"""The CVE-2025-4517 tree built by a real guest and copied out (the unit tier feeds the same
attacks to the extractor directly)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import boxvm
from tests.unit.test_security_tar import LONG, STEPS, outside  # noqa: F401  (a fixture, used by name)


@pytest.mark.backends("local", "remote")  # remote: the client extracts what the server relays
async def test_copy_out_of_a_deep_symlinked_tree_from_a_real_box(
    shared_box: boxvm.Box,
    tmp_path: Path,
    outside: Path,  # noqa: F811  (the imported fixture)
) -> None:
    """A guest builds the long-dir + short-symlink tree of CVE-2025-4517 (as deep as the
    guest's own PATH_MAX allows) with links out of it and world-writable, sticky and
    setuid modes; copied out, links arrive as links, modes are plain, nothing outside
    changes."""
    steps = STEPS[:15]
    script = (
        f"set -e; rm -rf /root/evil; mkdir /root/evil; cd /root/evil; p=; "
        f"for s in {' '.join(steps)}; do mkdir ${{p}}{LONG}; ln -s {LONG} ${{p}}$s; p=${{p}}{LONG}/; done; "
        f"ln -s {'/'.join(['..'] * len(steps))} ${{p}}l; "
        f"ln -s {'/'.join(steps)}/l/../outside/secret escape; echo inside > file; ln file hard; "
        f"chmod 4777 file; mkdir tmp; chmod 1777 tmp"
    )
    r = await shared_box.exec(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    (tmp_path / "dest").mkdir()
    await shared_box.copy_out("/root/evil", tmp_path / "dest" / "evil")
    evil = tmp_path / "dest" / "evil"
    assert os.readlink(evil / "escape") == f"{'/'.join(steps)}/l/../outside/secret"
    assert os.readlink(evil / "a") == LONG
    assert (evil / "hard").stat().st_ino == (evil / "file").stat().st_ino
    assert (evil / "file").read_text() == "inside\n"
    assert stat.S_IMODE((evil / "file").stat().st_mode) == 0o775
    assert stat.S_IMODE((evil / "tmp").stat().st_mode) == 0o775
