"""No root needed to use boxes: image -> disk conversion and the whole lifecycle as an
ordinary user (created here when the suite runs as root, as CI does)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from boxvm.guest import bundle
from boxvm.images.default import ensure_slim
from boxvm.paths import Home
from tests.helpers import processes_of

USER = "boxvm-unpriv"
# What the runtime imports, copied where the test user can read it.
RUNTIME_PACKAGES = ["boxvm", "qemu", "click", "rich", "pygments", "markdown_it", "mdurl", "zstandard"]

SCRIPT = textwrap.dedent(
    """
    import os, sys, boxvm, boxvm.sync as bs
    assert os.geteuid() != 0, "must run unprivileged"
    with bs.Runtime() as rt:
        box = rt.create(boxvm.BoxOptions(image="boxvm/slim", memory_mib=256), name="unpriv")
        box.start()
        r = box.exec(["sh", "-c", "id -u; stat -c %u:%g /etc/passwd /home/user; echo data > /root/f"])
        print(r.stdout.decode().replace("\\n", " "))
        box.stop()
        box.start()
        print(box.exec(["cat", "/root/f"]).stdout.decode().strip())
        print(box.id)
        rt.remove(box.id, force=True)
    """
)


def _python() -> str:
    """A Python the test user can run (the venv's may live under root's home)."""
    for candidate in ("/usr/bin/python3.11", sys.executable):
        if os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("no usable python3.11")


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory the test user can reach (pytest's own tmp tree is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="boxvm-unpriv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_lifecycle_as_an_unprivileged_user(home: Home, work: Path) -> None:
    pkgs = work / "pkgs"
    site = Path(sysconfig.get_paths()["purelib"])
    repo = Path(__file__).resolve().parents[2]
    for name in RUNTIME_PACKAGES:
        src = repo / name if name == "boxvm" else site / name
        shutil.copytree(src, pkgs / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Give the user the guest bundle and the slim image's OCI layout (the smallest with a file
    # owned by someone else than root); the user converts it to an ext4 disk under fakeroot.
    user_home = Home.default(work / "home")
    user_home.ensure()
    b = bundle.find(home)
    assert b is not None
    shutil.copytree(b.path, user_home.guest / b.id)
    layout = ensure_slim(home)
    shutil.copytree(layout, user_home.images / "slim" / layout.name)
    (work / "script.py").write_text(SCRIPT)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(work),
        "BOXVM_HOME": str(user_home.root),
        "PYTHONPATH": str(pkgs),
    }
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True
            )
        subprocess.run(["chown", "-R", f"{USER}:", str(work)], check=True)
        cmd = ["runuser", "-u", USER, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()]]
    else:
        cmd = ["env", "-i", *[f"{k}={v}" for k, v in env.items()]]
    proc = subprocess.run([*cmd, _python(), str(work / "script.py")], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # root inside the box, and the image's ownership survived conversion by a non-root user
    assert lines[0].split() == ["0", "0:0", "1000:1000"]
    assert lines[1] == "data"
    assert processes_of(lines[2]) == []
    assert list((user_home.boxes).iterdir()) == []
