"""The embedded default image: a small Debian userland (busybox tools, bash, Python 3)
built locally from Debian packages into an OCI layout, so boxes work offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

from boxvm.guest import debs
from boxvm.images import oci
from boxvm.paths import Home
from boxvm.progress import Progress, silent

DEFAULT_REF = "boxvm/default"
FORMAT = 1
PACKAGES = ["busybox-static", "bash", "libtinfo6", *debs.PYTHON_PACKAGES]
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


def ensure_default(home: Home, progress: Progress = silent, *, refresh: bool = False) -> Path:
    """The default image's OCI layout directory, built on first use.

    An existing build is used without asking apt, so creating boxes works offline;
    ``refresh`` (``boxvm setup``) rebuilds when Debian has newer packages.
    """
    built = sorted((home.images / "default").glob("*/index.json"), key=lambda p: p.stat().st_mtime)
    if built and not refresh:
        return built[-1].parent
    wanted = debs.resolve(PACKAGES)
    h = hashlib.sha256(f"boxvm-default-{FORMAT}".encode())
    for deb in wanted:
        h.update(f"{deb.filename}:{deb.sha256}\n".encode())
    layout = home.images / "default" / h.hexdigest()[:16]
    if (layout / "index.json").is_file():
        return layout
    progress(f"building the default image from {len(wanted)} Debian packages")
    files = debs.fetch(wanted, home.cache / "debs")
    with home.staging("default-image-") as work:
        root = work / "rootfs"
        debs.unpack_tree([files[d.package] for d in wanted], root)
        for d, mode in (("root", 0o700), ("tmp", 0o1777), ("home", 0o755), ("proc", 0o555), ("sys", 0o555),
                        ("dev", 0o755), ("etc", 0o755), ("var/tmp", 0o1777), ("run", 0o755)):  # fmt: skip
            (root / d).mkdir(parents=True, exist_ok=True)
            os.chmod(root / d, mode)
        (root / "etc" / "passwd").write_text(PASSWD)
        (root / "etc" / "group").write_text(GROUP)
        (root / "home" / "user").mkdir()
        layer = work / "layer.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(root.rglob("*")):
                info = tar.gettarinfo(path, arcname=str(path.relative_to(root)))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if path == root / "home" / "user":
                    info.uid = info.gid = 1000
                    info.uname = info.gname = "user"
                if info.isreg():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        out = work / "layout"
        oci.write_layout(layer, out, CONFIG, DEFAULT_REF)
        layout.parent.mkdir(parents=True, exist_ok=True)
        if not layout.exists():
            out.rename(layout)
        shutil.rmtree(root, ignore_errors=True)
    progress("default image ready")
    return layout
