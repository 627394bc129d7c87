"""The guest bundle: kernel, initramfs and read-only guest root, built from Debian packages.

A bundle is identified by a hash of everything that goes into it (package checksums,
agent and init sources, module list), so a changed agent gives a new bundle id and
boxes record which bundle they booted. Built once under ``$BOXVM_HOME/guest/<id>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from boxvm.build import debs
from boxvm.build.cpio import write_cpio
from boxvm.build.ext4 import make_ext4
from boxvm.build.outputs import building, publish
from boxvm.errors import ImageError
from boxvm.paths import Home
from boxvm.progress import Progress, silent

BUILD_FORMAT = 1
KERNEL_META = "linux-image-cloud-amd64"
# The guest root: a shell toolbox and the agent's Python.
GUEST_PACKAGES = ["busybox-static", *debs.PYTHON_PACKAGES]
BOOT_MODULES = ["virtio_mmio", "virtio_blk", "virtio_console", "virtio_net"]


@dataclass(frozen=True)
class Bundle:
    id: str
    path: Path
    kernel_version: str

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.cpio"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.ext4"


def _sources() -> dict[str, bytes]:
    pkg = resources.files("boxvm.guest")
    names = ["agent.py", "protocol.py", "initramfs-init.sh", "guest-init.sh"]
    return {name: pkg.joinpath(name).read_bytes() for name in names}


def plan() -> tuple[str, list[debs.Deb]]:
    """Resolve the exact packages and compute the bundle id they (and our sources) give."""
    kernel_pkg = next(d for d in debs.depends_of(KERNEL_META) if d.startswith("linux-image-"))
    wanted = debs.resolve([kernel_pkg, *GUEST_PACKAGES])
    h = hashlib.sha256(f"boxvm-guest-{BUILD_FORMAT}".encode())
    for deb in wanted:
        h.update(f"{deb.filename}:{deb.sha256}\n".encode())
    for name, data in sorted(_sources().items()):
        h.update(name.encode() + hashlib.sha256(data).digest())
    h.update(",".join(BOOT_MODULES).encode())
    return h.hexdigest()[:16], wanted


def load(path: Path) -> Bundle | None:
    """The complete bundle in ``path``, or None if there is none (or it is unfinished)."""
    meta = path / "bundle.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return Bundle(info["id"], path, info["kernel_version"])


def find(home: Home, bundle_id: str | None = None) -> Bundle | None:
    """Bundle ``bundle_id`` if given and present, else the newest complete one; never asks
    apt, so it works offline."""
    if bundle_id and (wanted := load(home.guest / bundle_id)) is not None:
        return wanted
    complete = [p for p in home.guest.glob("*/bundle.json")] if home.guest.is_dir() else []
    if not complete:
        return None
    return load(max(complete, key=lambda p: p.stat().st_mtime).parent)


def ensure(home: Home, progress: Progress = silent) -> Bundle:
    """Return the current bundle, building it first if it is missing."""
    home.ensure()
    bundle_id, wanted = plan()
    path = home.guest / bundle_id
    if (built := load(path)) is not None:
        return built
    with building(path):
        if (built := load(path)) is not None:  # another process built it meanwhile
            return built
        return _build(home, bundle_id, wanted, path, progress)


def _build(home: Home, bundle_id: str, wanted: list[debs.Deb], path: Path, progress: Progress) -> Bundle:
    kernel = next(d for d in wanted if d.package.startswith("linux-image-"))
    progress(f"downloading {len(wanted)} Debian packages for the guest")
    files = debs.fetch(wanted, home.cache / "debs")
    with home.staging("guest-") as work:
        progress("extracting the kernel and modules")
        kernel_version = _kernel(files[kernel.package], work)
        progress("building the initramfs")
        _initramfs(files["busybox-static"], work)
        progress("building the guest root filesystem")
        _rootfs([files[d.package] for d in wanted if d is not kernel], work)
        (work / "bundle.json").write_text(
            json.dumps(
                {"id": bundle_id, "kernel_version": kernel_version, "packages": [d.filename for d in wanted]},
                indent=2,
            )
        )
        shutil.rmtree(work / "stage", ignore_errors=True)
        publish(work, path, "bundle.json")
    progress(f"guest bundle {bundle_id} ready")
    return Bundle(bundle_id, path, kernel_version)


def _kernel(deb: Path, work: Path) -> str:
    stage = work / "stage" / "kernel"
    debs.extract(deb, stage, re.compile(r"(boot/vmlinuz-|lib/modules/.*/kernel/(drivers|net|lib)/)"))
    vmlinuz = next((stage / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    modules = {p.stem: p for p in (stage / "lib/modules" / version).rglob("*.ko")}
    order: list[str] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        path = modules.get(name) or modules.get(name.replace("_", "-"))
        if path is None:
            raise ImageError(f"kernel {version} has no module {name}")
        for dep in _module_depends(path):
            visit(dep)
        order.append(name)

    for name in BOOT_MODULES:
        visit(name)
    mod_dir = work / "stage" / "initramfs" / "modules"
    mod_dir.mkdir(parents=True)
    for name in order:
        src = modules.get(name) or modules[name.replace("_", "-")]
        shutil.copyfile(src, mod_dir / f"{name}.ko")
    (mod_dir / "order").write_text("\n".join(order) + "\n")
    return version


def _module_depends(path: Path) -> list[str]:
    """Read ``depends=`` from a module's .modinfo strings (the kernel package has no modules.dep)."""
    data = path.read_bytes()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    return [d.decode() for d in m.group(1).split(b",") if d] if m else []


def _initramfs(busybox_deb: Path, work: Path) -> None:
    root = work / "stage" / "initramfs"
    debs.extract(busybox_deb, work / "stage" / "bb", re.compile(r"bin/busybox$"))
    (root / "bin").mkdir(parents=True)
    shutil.copyfile(work / "stage" / "bb" / "bin" / "busybox", root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    (root / "init").write_bytes(_sources()["initramfs-init.sh"])
    (root / "init").chmod(0o755)
    with (work / "initramfs.cpio").open("wb") as out:
        write_cpio(root, out)


def _rootfs(packages: list[Path], work: Path) -> None:
    root = work / "stage" / "rootfs"
    debs.unpack_tree(packages, root)
    for d in ("proc", "sys", "dev", "run", "tmp", "c", "root", "etc"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
    opt = root / "opt" / "boxvm"
    opt.mkdir(parents=True)
    sources = _sources()
    (opt / "agent.py").write_bytes(sources["agent.py"])
    (opt / "protocol.py").write_bytes(sources["protocol.py"])
    debs.precompile(opt, "/opt/boxvm")
    (root / "sbin" / "boxvm-init").write_bytes(sources["guest-init.sh"])
    (root / "sbin" / "boxvm-init").chmod(0o755)
    make_ext4(root, work / "rootfs.ext4", label="boxvm-guest", extra_mib=64)
