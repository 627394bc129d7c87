"""A Debian root filesystem built by ``mmdebstrap`` from cached packages, so it builds offline.

The host's apt (its package lists) resolves the whole package set once: Essential and
``Priority: required`` packages (what mmdebstrap's ``minbase`` installs) plus the wanted ones,
with their dependencies. Those exact files are downloaded into a cache (``debs.fetch``: only
what is missing, each checked against the lists' SHA-256), and mmdebstrap installs from a
local flat repository holding only them, never from the network. The same package set
therefore always gives the same image, with or without a connection.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote

from boxvm.build import debs
from boxvm.errors import ImageError

SUITE = "bookworm"
# Documentation and translations nobody reads in a sandbox (copyright files stay).
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
]
# Where a Debian host keeps its mirror list; the image gets a copy so `apt-get install` works in a box with network.
HOST_SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
BUILD_TIMEOUT = 20 * 60


def base_packages() -> list[str]:
    """What ``minbase`` installs, as the host's lists know it: Essential and required packages, and apt."""
    proc = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"apt-cache could not list packages: {proc.stderr.strip()} (run `apt-get update` once)")
    names = {"apt"}
    for record in proc.stdout.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Priority|Essential): (\S+)$", record, re.M))
        if fields.get("Priority") == "required" or fields.get("Essential") == "yes":
            names.add(fields["Package"])
    return sorted(names)


def closure(packages: list[str]) -> list[debs.Deb]:
    """Every file a system made of ``packages`` needs, resolved as from an empty system
    (exact versions and SHA-256 from the host's lists; no download)."""
    with tempfile.TemporaryDirectory(prefix="boxvm-apt-") as tmp:
        status = Path(tmp) / "status"
        status.touch()
        (Path(tmp) / "archives" / "partial").mkdir(parents=True)
        proc = subprocess.run(
            [
                "apt-get", "install", "-qq", "--print-uris", "--no-install-recommends",
                "-o", f"Dir::State::Status={status}", "-o", f"Dir::Cache::Archives={tmp}/archives",
                "-o", "Debug::NoLocking=1", *packages,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise ImageError(f"apt could not resolve the image's packages: {proc.stderr.strip()[-2000:]}")
    pins = []
    for line in proc.stdout.splitlines():
        m = re.match(r"'[^']+' ([^_\s]+)_([^_\s]+)_\S+\.deb ", line)
        if m:
            pins.append(f"{m.group(1)}={unquote(m.group(2))}")
    if not pins:
        raise ImageError("apt resolved no packages for the image (run `apt-get update` once, as root)")
    return debs.resolve(pins)


def write_repo(files: list[Path], repo: Path) -> None:
    """A flat apt repository of exactly ``files`` (hard links to the cache), suite ``SUITE``."""
    repo.mkdir(parents=True)
    for f in files:
        os.link(f, repo / f.name)
    for what, out in (("packages", "Packages"), ("release", "Release")):
        with (repo / out).open("w") as dest:
            proc = subprocess.run(
                ["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={SUITE}",
                 "-o", f"APT::FTPArchive::Release::Codename={SUITE}", what, "."],
                cwd=repo, stdout=dest, stderr=subprocess.PIPE, text=True, check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(f"apt-ftparchive failed: {proc.stderr.strip()} (install the apt-utils package)")


def mode() -> str:
    """root as root; otherwise fakechroot, which runs as the calling user and so can read the
    cache in its 0700 home (unshare mode's subordinate ids could not)."""
    return "root" if os.geteuid() == 0 else "fakechroot"


def build_tar(packages: list[str], repo: Path, out: Path, work: Path) -> None:
    """Run mmdebstrap (minbase + ``packages``) from ``repo`` into the tar ``out``."""
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed: run scripts/bootstrap.sh (or apt-get install mmdebstrap)")
    sources = next((p for p in HOST_SOURCES if p.is_file()), None)
    hooks = [
        # A `user` account for non-root execs, as in common sandbox images.
        'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user',
        # The builder's identity files must not end up in the image (the guest mounts its own).
        ': > "$1/etc/resolv.conf"; echo localhost > "$1/etc/hostname"',
        'rm -f "$1/etc/apt/sources.list"',
    ]
    if sources is not None:
        hooks.append(f"upload {sources} /etc/apt/{'sources.list.d/' if sources.suffix == '.sources' else ''}"
                     f"{sources.name}")  # fmt: skip
    cmd = [
        "mmdebstrap", f"--mode={mode()}", "--variant=minbase", "--format=tar", "--quiet",
        f"--include={','.join(packages)}",
        *[f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES],
        *[f"--customize-hook={hook}" for hook in hooks],
        SUITE, str(out), f"deb [trusted=yes] copy://{repo} ./",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(work)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"mmdebstrap took longer than {BUILD_TIMEOUT} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise ImageError(f"mmdebstrap could not build the image:\n{tail}")
