"""Images: resolve a reference to a verified OCI image and turn it into a base disk.

``image=None`` is the embedded default image; a path is a local OCI layout directory
or archive. Registry references are the seam for registry pulls (not yet supported).
Base disks are ext4 in qcow2, built once per (image digest, disk size) and shared by
every box as the backing layer of its own overlay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxvm.errors import ImageError
from boxvm.images import oci
from boxvm.images.default import DEFAULT_REF, ensure_default
from boxvm.images.ext4 import make_ext4
from boxvm.paths import Home
from boxvm.progress import Progress, silent
from boxvm.store import ImageRecord, Store


@dataclass(frozen=True)
class ResolvedImage:
    reference: str
    digest: str
    config: dict[str, Any]
    layout: Path

    @property
    def runtime_config(self) -> dict[str, Any]:
        """The image's ``config`` section (Env, Cmd, Entrypoint, WorkingDir, User)."""
        return self.config.get("config") or {}


class ImageStore:
    def __init__(self, home: Home, store: Store) -> None:
        self.home = home
        self.store = store

    def resolve(self, reference: str | None, progress: Progress = silent) -> ResolvedImage:
        if reference is None or reference == DEFAULT_REF:
            layout, ref = ensure_default(self.home, progress), DEFAULT_REF
        else:
            path = Path(reference).expanduser()
            if not (reference.startswith(("/", ".", "~")) or path.exists()):
                raise ImageError(
                    f"image {reference!r}: registry pulls are not supported yet; "
                    "give a local OCI layout directory or archive, or omit image for the default"
                )
            layout, ref = path.absolute(), str(path.absolute())
        with self.home.staging("image-") as work:
            image = oci.read_layout(layout, work)
            if image.layout != layout:  # an archive: keep its unpacked layout by digest
                keep = self.home.images / "layouts" / image.digest.split(":")[1]
                if not keep.exists():
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    image.layout.rename(keep)
                image = oci.Image(image.digest, image.config, image.layers, keep)
        return ResolvedImage(ref, image.digest, image.config, image.layout)

    def base_disk(self, image: ResolvedImage, size_gb: int, progress: Progress = silent) -> Path:
        """The shared ext4 base disk for this image at this size, built on first use."""
        target = self.home.images / image.digest.split(":")[1] / f"base-{size_gb}g.qcow2"
        if target.exists():
            return target
        progress(f"converting image {image.reference} to a {size_gb} GiB ext4 disk")
        t0 = time.monotonic()
        with self.home.staging("base-") as work:
            rootfs = work / "rootfs"
            state = work / "fakeroot.state"
            cmd = [sys.executable, "-m", "boxvm.images.unpack", str(image.layout), str(rootfs)]
            unprivileged = os.geteuid() != 0
            if unprivileged:
                state.touch()
                cmd = ["fakeroot", "-s", str(state), "--", *cmd]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ImageError(f"image {image.reference}: {proc.stderr.strip().splitlines()[-1:]}")
            raw = work / "disk.ext4"
            make_ext4(
                rootfs, raw, label="boxvm-data", size_bytes=size_gb << 30,
                fakeroot_state=state if unprivileged else None,
            )  # fmt: skip
            qcow = work / "base.qcow2"
            subprocess.run(
                ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                check=True,
                capture_output=True,
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(qcow, 0o444)
            os.replace(qcow, target)
        self.store.put_image(ImageRecord(image.digest, image.reference, image.config, target.stat().st_size))
        progress(f"image disk ready in {time.monotonic() - t0:.1f} s")
        return target
