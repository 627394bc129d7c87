"""Debian packages as build input: resolve, download (verified), and read their files.

apt does the resolving and fetching; we only ask it for URIs and checksums so that
downloads are cached by file name and verified by us, and we read package contents
straight from ``dpkg-deb --fsys-tarfile`` so nothing needs root or a chroot.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from boxvm import processes
from boxvm.errors import ImageError
from boxvm.tarstream import extract_as_recorded

# Debian's Python 3.11 and the shared libraries its stdlib needs; libraries that only
# optional modules load (readline, sqlite, ...) are left out on purpose.
PYTHON_PACKAGES = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
]


@dataclass(frozen=True)
class Deb:
    package: str
    filename: str
    sha256: str

    @property
    def pin(self) -> str:
        """``package=version`` as apt takes it: this exact file, not whatever is the candidate now."""
        return f"{self.package}={unquote(self.filename.split('_')[1])}"


def resolve(packages: list[str]) -> list[Deb]:
    """Ask apt which files the current candidates of ``packages`` are (no download)."""
    proc = subprocess.run(
        ["apt-get", "download", "--print-uris", *packages], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ImageError(
            f"apt could not resolve {' '.join(packages)}: {proc.stderr.strip()} (run `apt-get update` once, as root)"
        )
    debs = []
    for line in proc.stdout.splitlines():
        m = re.match(r"'[^']+' (\S+) \d+ SHA256:([0-9a-f]{64})", line)
        if m:
            debs.append(Deb(m.group(1).split("_", 1)[0], m.group(1), m.group(2)))
    if len(debs) != len(packages):
        raise ImageError(f"apt resolved {len(debs)} of {len(packages)} packages: {proc.stdout}")
    return debs


def depends_of(package: str) -> list[str]:
    """Direct ``Depends`` of a package (used to pin the kernel behind its meta package)."""
    out = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True, check=True)
    return [ln.split(":", 1)[1].strip() for ln in out.stdout.splitlines() if ln.strip().startswith("Depends:")]


def fetch(debs: list[Deb], cache: Path) -> dict[str, Path]:
    """Download what is not cached yet; verify every file's SHA-256. Returns package -> path."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [d for d in debs if not _valid(cache / d.filename, d.sha256)]
    if missing:
        # One download directory per process: two builds sharing a cache (runners on one
        # host) must not clear or read each other's half-downloaded files.
        for stale in cache.glob(".partial-*"):
            pid = stale.name.split("-")[1]
            if pid.isdigit() and not processes.alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=cache))
        proc = subprocess.run(
            ["apt-get", "download", *[d.pin for d in missing]],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ImageError(f"apt-get download failed: {proc.stderr.strip()}")
        for deb in missing:
            got = work / deb.filename
            if not _valid(got, deb.sha256):
                raise ImageError(f"{deb.filename}: checksum mismatch after download")
            got.replace(cache / deb.filename)  # a concurrent build's verified copy is the same bytes
        shutil.rmtree(work, ignore_errors=True)
    return {d.package: cache / d.filename for d in debs}


def _valid(path: Path, sha256: str) -> bool:
    if not path.exists():
        return False
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == sha256


def members(deb: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Stream a package's data archive: yields each member with the open tar to read it."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        try:
            for member in tar:
                yield member, tar
        except GeneratorExit:  # the caller stopped early: dpkg-deb's broken pipe is expected
            proc.kill()
            proc.wait()
            raise
    proc.stdout.close()
    if proc.wait() != 0:
        raise ImageError(f"dpkg-deb could not read {deb.name}")


def extract(deb: Path, dest: Path, keep: re.Pattern[str] | None = None) -> None:
    """Unpack a (trusted, checksum-verified) Debian package's files under ``dest``."""
    for member, tar in members(deb):
        if keep is not None and not keep.match(member.name.lstrip("./")):
            continue
        extract_as_recorded(tar, member, dest)


# Documentation, locales and stdlib parts no box or agent needs.
_SKIP = re.compile(
    r"(usr/share/(doc|man|locale|lintian|info)/|usr/lib/python3\.11/(test|idlelib|tkinter|ensurepip|"
    r"lib2to3|pydoc_data|turtledemo|distutils)/|usr/lib/x86_64-linux-gnu/gconv/)"
)


def unpack_tree(packages: list[Path], dest: Path) -> None:
    """Unpack packages into one root tree, as an unconfigured minimal system.

    Maintainer scripts are not run; what they would have made (busybox applet links,
    python3 link, /etc/passwd) the callers add. Bytecode is compiled here because Debian
    ships none and the first imports would otherwise take ~9 s under TCG.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for deb in packages:
        for member, tar in members(deb):
            if not _SKIP.match(member.name.lstrip("./")):
                extract_as_recorded(tar, member, dest)
    busybox = dest / "bin" / "busybox"
    if busybox.exists():
        applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
        for applet in applets.stdout.split():
            link = dest / applet
            if not os.path.lexists(link):
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
    python = dest / "usr" / "bin" / "python3.11"
    if python.exists():
        if not os.path.lexists(dest / "usr" / "bin" / "python3"):
            (dest / "usr" / "bin" / "python3").symlink_to("python3.11")
        precompile(dest / "usr" / "lib" / "python3.11", "/usr/lib/python3.11")


def precompile(tree: Path, guest_path: str) -> None:
    """Byte-compile with unchecked hashes, valid whatever the guest's clock says.

    The host's Python must share the guest's minor version (the magic number is per minor).
    """
    import compileall
    import py_compile

    ok = compileall.compile_dir(
        tree,
        quiet=2,
        workers=0,
        ddir=guest_path,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    if not ok:
        raise ImageError(f"byte-compiling {guest_path} failed")
