"""The built-in images, built locally from Debian packages into OCI layouts so boxes work offline.

``boxvm/default`` is a Debian bookworm userland made by mmdebstrap (``boxvm.build.mmdebstrap``):
what people expect of a sandbox (Python with its whole standard library, pip, git, curl, ...).
``boxvm/slim`` is the smallest that boots: busybox tools, bash and Python, merged by our own
code from a dozen packages. Each build lives in ``images/<name>/<id>``, the id a hash of the
exact package files, with a ``build.json`` (packages, size, build time) beside the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from boxvm.build import debs, mmdebstrap
from boxvm.build.outputs import building, publish
from boxvm.images import oci
from boxvm.paths import Home
from boxvm.progress import Progress, silent

DEFAULT_REF = "boxvm/default"
SLIM_REF = "boxvm/slim"
BUILTIN = (DEFAULT_REF, SLIM_REF)
FORMAT = 2
DEFAULT_PACKAGES = [
    "python3", "python3-venv", "python3-pip", "ca-certificates", "curl", "git", "procps", "iproute2",
    "less", "vim-tiny", "nano", "ncurses-bin", "tzdata", "openssh-client",
]  # fmt: skip
BUILD_TOOLS = ["build-essential", "python3-dev"]
# coreutils only for its nohup, which busybox-static lacks.
SLIM_PACKAGES = ["busybox-static", "bash", "libtinfo6", "libsqlite3-0", "libreadline8", "coreutils",
                 *debs.PYTHON_PACKAGES]  # fmt: skip
_SLIM_KEEP = re.compile(r"usr/bin/nohup$")
CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
        "Cmd": ["/bin/bash"],
        "WorkingDir": "/root",
    },
}
PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    "user:x:1000:1000:user:/home/user:/bin/bash\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\ntty:x:5:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n"


def ensure_builtin(home: Home, reference: str, progress: Progress = silent) -> Path:
    """The layout of built-in image ``reference`` (``boxvm/default`` or ``boxvm/slim``)."""
    return ensure_slim(home, progress) if reference == SLIM_REF else ensure_default(home, progress)


def ensure_default(
    home: Home, progress: Progress = silent, *, refresh: bool = False, build_tools: bool = False
) -> Path:
    """The default image's OCI layout directory, built on first use.

    An existing build is used without asking apt, so creating boxes works offline;
    ``refresh`` (``boxvm setup --refresh``) resolves the package set again from the host's
    lists and rebuilds if it changed. ``build_tools`` adds a compiler toolchain.
    """
    existing = [p for p in builds(home, "default") if not build_tools or info(p).get("build_tools")]
    if existing and not refresh:
        return existing[-1]
    packages = DEFAULT_PACKAGES + (BUILD_TOOLS if build_tools else [])
    progress("resolving the default image's Debian packages")
    wanted = mmdebstrap.closure(mmdebstrap.base_packages() + packages)
    layout = home.images / "default" / _image_id("default", packages, wanted)
    with building(layout):  # one build at a time; one made meanwhile is used
        if (layout / "index.json").is_file():
            os.utime(layout / "index.json")  # the newest build is the one in use
            return layout
        progress(f"building the default image from {len(wanted)} Debian packages (mmdebstrap)")
        t0 = time.monotonic()
        files = debs.fetch(wanted, home.cache / "apt")
        with home.staging("default-image-") as work:
            mmdebstrap.write_repo([files[d.package] for d in wanted], work / "repo")
            layer = work / "layer.tar"
            mmdebstrap.build_tar(packages, work / "repo", layer, work)
            extra = {"build_tools": build_tools}
            return _publish(home, layer, layout, DEFAULT_REF, wanted, t0, progress, extra)


def ensure_slim(home: Home, progress: Progress = silent, *, refresh: bool = False) -> Path:
    """The slim image's layout: busybox, bash and Python, no package manager; built on first use."""
    existing = builds(home, "slim")
    if existing and not refresh:
        return existing[-1]
    wanted = debs.resolve(SLIM_PACKAGES)
    layout = home.images / "slim" / _image_id("slim", SLIM_PACKAGES, wanted)
    with building(layout):  # one build at a time; one made meanwhile is used
        if (layout / "index.json").is_file():
            os.utime(layout / "index.json")
            return layout
        progress(f"building the slim image from {len(wanted)} Debian packages")
        t0 = time.monotonic()
        files = debs.fetch(wanted, home.cache / "debs")
        with home.staging("slim-image-") as work:
            root = work / "rootfs"
            debs.unpack_tree([files[d.package] for d in wanted if d.package != "coreutils"], root)
            debs.extract(files["coreutils"], root, _SLIM_KEEP)
            for d, mode in (("root", 0o700), ("tmp", 0o1777), ("home", 0o755), ("proc", 0o555), ("sys", 0o555),
                            ("dev", 0o755), ("etc", 0o755), ("var/tmp", 0o1777), ("run", 0o755)):  # fmt: skip
                (root / d).mkdir(parents=True, exist_ok=True)
                os.chmod(root / d, mode)
            (root / "etc" / "passwd").write_text(PASSWD)
            (root / "etc" / "group").write_text(GROUP)
            (root / "home" / "user").mkdir()
            layer = work / "layer.tar"
            _tar_tree(root, layer)
            shutil.rmtree(root, ignore_errors=True)
            return _publish(home, layer, layout, SLIM_REF, wanted, t0, progress, {})


def builds(home: Home, name: str) -> list[Path]:
    """Complete builds of built-in image ``name``, oldest first (the last is the one in use)."""
    found = [p for p in (home.images / name).glob("*/index.json") if info(p.parent).get("format") == FORMAT]
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def info(layout: Path) -> dict[str, Any]:
    """What ``build.json`` recorded about a build (empty for one from before it existed)."""
    try:
        data = json.loads((layout / "build.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _image_id(name: str, packages: list[str], wanted: list[debs.Deb]) -> str:
    h = hashlib.sha256(f"boxvm-{name}-{FORMAT}\n{' '.join(packages)}\n".encode())
    for deb in sorted(wanted, key=lambda d: d.filename):
        h.update(f"{deb.filename}:{deb.sha256}\n".encode())
    return h.hexdigest()[:16]


def _publish(
    home: Home,
    layer: Path,
    layout: Path,
    ref: str,
    wanted: list[debs.Deb],
    t0: float,
    progress: Progress,
    extra: dict[str, Any],
) -> Path:
    size = layer.stat().st_size
    out = layer.parent / "layout"
    oci.write_layout(layer, out, CONFIG, ref)
    seconds = round(time.monotonic() - t0, 1)
    record = {"format": FORMAT, "reference": ref, "packages": sorted(d.filename for d in wanted), "layer_bytes": size,
              "build_seconds": seconds, **extra}  # fmt: skip
    (out / "build.json").write_text(json.dumps(record, indent=1))
    publish(out, layout, "index.json")
    progress(f"{ref} ready: {size / 1e6:.0f} MB, built in {seconds:.0f} s")
    return layout


def _tar_tree(root: Path, layer: Path) -> None:
    """The slim tree as one layer, everything owned by root but the user's home."""
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            member = tar.gettarinfo(path, arcname=str(path.relative_to(root)))
            member.uid = member.gid = 0
            member.uname = member.gname = "root"
            if path == root / "home" / "user":
                member.uid = member.gid = 1000
                member.uname = member.gname = "user"
            if member.isreg():
                with path.open("rb") as f:
                    tar.addfile(member, f)
            else:
                tar.addfile(member)
