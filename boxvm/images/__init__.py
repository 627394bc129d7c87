"""Images: resolve a reference to a verified OCI image and turn it into a base disk.

``image=None`` is the embedded default image; a path is a local OCI layout directory
or archive; anything else is a registry reference, pulled into the cache
(``boxvm.images.registry``) the first time it is used.
Base disks are ext4 in qcow2, built once per (image digest, disk size) and shared by
every box as the backing layer of its own overlay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boxvm import locks
from boxvm.build.ext4 import make_ext4
from boxvm.build.outputs import building
from boxvm.disks import qcow2
from boxvm.disks.layers import fsync_dir
from boxvm.errors import ImageError, InvalidArgument, InvalidState, NotFound
from boxvm.images import oci
from boxvm.images.default import BUILTIN, DEFAULT_REF, ensure_builtin
from boxvm.images.reference import looks_like_reference
from boxvm.images.reference import parse as parse_reference
from boxvm.options import check_image_config
from boxvm.paths import Home
from boxvm.progress import Progress, silent
from boxvm.store import ImageRecord, Store

if TYPE_CHECKING:
    from boxvm.images.registry import Credentials


@dataclass(frozen=True)
class ResolvedImage:
    reference: str
    digest: str
    config: dict[str, Any]
    layout: Path

    @property
    def runtime_config(self) -> dict[str, Any]:
        """The image's ``config`` section (Env, Cmd, Entrypoint, WorkingDir, User), checked
        like an archive's (``check_image_config``) before any box record holds it."""
        try:
            return check_image_config(self.config.get("config"))
        except InvalidArgument as exc:
            raise ImageError(f"image {self.reference} has an invalid config: {exc.message}") from exc


class ImageStore:
    def __init__(self, home: Home, store: Store) -> None:
        self.home = home
        self.store = store
        # None: any host path names a local image (the local API). The REST server sets its
        # allow-list check here: every image string that is a path then goes through it, and
        # nothing else is looked up on the filesystem.
        self.path_gate: Callable[[str], Path] | None = None

    def resolve(
        self,
        reference: str | None,
        progress: Progress = silent,
        creds: Credentials | None = None,
        insecure: bool = False,
    ) -> ResolvedImage:
        """The image for ``reference``: the default, a local OCI layout or archive (a path),
        or a registry reference, pulled into the cache unless it is there already."""
        if reference is None or reference in BUILTIN:
            ref = reference or DEFAULT_REF
            layout = ensure_builtin(self.home, ref, progress)
        elif self.path_gate is not None and not looks_like_reference(reference):
            layout = self.path_gate(reference)
            ref = str(layout)
        elif self.path_gate is None and (not looks_like_reference(reference) or Path(reference).expanduser().exists()):
            path = Path(reference).expanduser()
            layout, ref = path.absolute(), str(path.absolute())
        else:
            from boxvm.images import registry  # httpx only when pulling

            parsed = parse_reference(reference)
            ref = str(parsed)
            cached = self._pulled_layout(ref) if parsed.digest else None  # a digest never moves: no request
            layout = cached or registry.pull(parsed, self.home, creds, insecure, progress)
        with self.home.staging("image-") as work:
            image = oci.read_layout(layout, work)
            if image.layout != layout:  # an archive: keep its unpacked layout by digest
                keep = self.home.images / "layouts" / image.digest.split(":")[1]
                if not keep.exists():
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        image.layout.rename(keep)
                    except OSError as exc:  # another create from this archive kept it first (by digest: the same)
                        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                image = oci.Image(image.digest, image.config, image.layers, keep)
        if self.store.get_image(image.digest) is None:  # the first name it was used by stays its name
            size = sum(p.stat().st_size for p in (image.layout / "blobs" / "sha256").iterdir())
            self.store.put_image(ImageRecord(image.digest, ref, image.config, size))
        self.store.add_image_ref(ref, image.digest)
        return ResolvedImage(ref, image.digest, image.config, image.layout)

    def _pulled_layout(self, reference: str) -> Path | None:
        digest = self.store.image_refs().get(reference)
        layout = self.home.images / "layouts" / digest.split(":")[1] if digest else None
        return layout if layout is not None and (layout / "index.json").exists() else None

    def find(self, reference: str) -> ImageRecord:
        """A cached image by reference (as given or normalised), digest or digest prefix."""
        records = self.store.list_images()
        refs = self.store.image_refs()
        wanted = [reference]
        if looks_like_reference(reference):
            with contextlib.suppress(ImageError):
                wanted.append(str(parse_reference(reference)))
        for name in wanted:
            digest = refs.get(name, name)
            for rec in records:
                if rec.digest == digest:
                    return rec
        hexpart = reference.removeprefix("sha256:")
        matches = [r for r in records if len(hexpart) >= 6 and r.digest.split(":")[1].startswith(hexpart)]
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"no cached image {reference!r}: `boxvm image ls` lists them")

    async def remove(self, reference: str, users: Callable[[str], list[str]]) -> ImageRecord:
        """Forget an image: its base disks, its pulled layout and blobs no other image
        shares. Refused while a box (``users(digest)``: their names) is built on it, counted
        under the image's lock, which a create holds until its box's record exists
        (``in_use``): a box made meanwhile would back onto a deleted base disk, and the next
        build under that name would be another file system under its layers."""
        rec = self.find(reference)
        async with self._flocked(rec.digest, fcntl.LOCK_EX):
            used_by = users(rec.digest)
            if used_by:
                raise InvalidState(
                    f"image {rec.reference} is used by box(es) {', '.join(sorted(used_by))}: remove them first"
                )
            deleting = asyncio.ensure_future(asyncio.to_thread(self._delete, rec))
            try:
                await asyncio.shield(deleting)
            except asyncio.CancelledError:
                await deleting  # the lock is held until the deletion, which cannot be stopped, is over
                raise
        return rec

    def _delete(self, rec: ImageRecord) -> None:
        shutil.rmtree(self.home.images / rec.digest.split(":")[1], ignore_errors=True)
        from boxvm.images import registry

        registry.remove_layout(self.home, rec.digest)
        self.store.delete_image(rec.digest)

    @contextlib.asynccontextmanager
    async def in_use(self, digest: str) -> AsyncIterator[None]:
        """A create's shared hold on the image, from before its base disk until its box's
        record exists: a removal waits for it (and then counts the box)."""
        async with self._flocked(digest, fcntl.LOCK_SH):
            if self.store.get_image(digest) is None:
                raise NotFound(f"image {digest} was removed meanwhile: create the box again")
            yield

    @contextlib.asynccontextmanager
    async def _flocked(self, digest: str, mode: int) -> AsyncIterator[None]:
        """The image's lock in ``mode`` (waiting removals held worker threads and starved the
        create they waited for: ``locks.acquire`` polls)."""
        self.home.images.mkdir(exist_ok=True)
        fd = await locks.acquire(self._lock(digest), mode, every=0.05)
        try:
            yield
        finally:
            os.close(fd)

    def _lock(self, digest: str) -> Path:
        """The image's lock file, beside its folder (which a removal deletes)."""
        return self.home.images / f".{digest.split(':')[1]}.lock"

    def base_disk(self, image: ResolvedImage, size_gb: int, progress: Progress = silent) -> Path:
        """The shared ext4 base disk for this image at this size, built on first use, once.

        A build is not byte-reproducible (mke2fs picks a new UUID and checksum seed), so a
        second build must never take the name of a first that boxes already run on: their
        upper layers would then lie over another file system's blocks, and the next reader
        of the path (an export, a restart) sees directory blocks whose checksums fail.
        Concurrent first creates wait for one build under a lock, and the name is linked,
        never replaced."""
        target = self.home.images / image.digest.split(":")[1] / f"base-{size_gb}g.qcow2"
        if target.exists():
            return target
        with building(target):
            if target.exists():  # another caller built it while this one waited
                return target
            return self._build_base(image, size_gb, target, progress)

    def _build_base(self, image: ResolvedImage, size_gb: int, target: Path, progress: Progress) -> Path:
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
            qcow2.from_raw(raw, qcow)
            os.chmod(qcow, 0o444)
            with open(qcow, "rb") as f:  # its bytes durable before the name that publishes them
                os.fsync(f.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)  # (an image removal may have taken it)
            try:
                os.link(qcow, target)  # create-only: a build of an older boxvm (no lock) may have won
            except FileExistsError:
                return target
            fsync_dir(target.parent)
            fsync_dir(target.parent.parent)
        progress(f"image disk ready in {time.monotonic() - t0:.1f} s")
        return target
