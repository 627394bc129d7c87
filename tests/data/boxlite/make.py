"""Re-create the BoxLite archives kept here, with the real BoxLite (not a boxvm dependency).

    python3 -m venv /tmp/bl-venv && /tmp/bl-venv/bin/pip install boxlite==0.10.8
    /tmp/bl-venv/bin/python tests/data/boxlite/make.py  # needs busybox-static's .deb, qemu-img, debugfs

The image is busybox-static plus /data/in-image.txt. ``image-data.boxlite`` is a box created
from it and exported as is; ``own-data.boxlite`` also has /data/own.txt written into the box's
own disk overlay. On hosts without hardware virtualization BoxLite's ``start()`` fails, but it
creates the disk first, and export works; the overlay is written from the host (debugfs on a raw
copy, then only the changed blocks written into the overlay with qemu-io).
"""

import asyncio
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import boxlite

HERE = Path(__file__).resolve().parent
BLOCK = 4096


def build_layout(work: Path) -> Path:
    root = work / "root"
    subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, check=True)
    subprocess.run(["dpkg-deb", "-x", glob.glob(str(work / "busybox-static_*.deb"))[0], str(root)], check=True)
    for d in ("data", "etc", "root", "tmp"):
        (root / d).mkdir(exist_ok=True)
    for applet in ("sh", "cat", "ls", "echo", "sleep", "mkdir"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "data/in-image.txt").write_text("in-the-image\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    layer = work / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(root, arcname=".", filter=lambda m: m.replace(uid=0, gid=0, uname="", gname="", deep=False))
    blobs = work / "layout/blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    lay = put(layer.read_bytes(), "application/vnd.oci.image.layer.v1.tar")
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [lay["digest"]]}}  # fmt: skip
    cfg = put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest_type = "application/vnd.oci.image.manifest.v1+json"
    manifest = {"schemaVersion": 2, "mediaType": manifest_type, "config": cfg, "layers": [lay]}
    man = put(json.dumps(manifest).encode(), manifest_type)
    (work / "layout/index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))
    (work / "layout/oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return work / "layout"


def write_into_overlay(overlay: Path, work: Path) -> None:
    before, after = work / "before.raw", work / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(before)], check=True)
    subprocess.run(["cp", "--sparse=always", str(before), str(after)], check=True)
    (work / "own.txt").write_text("in-the-box-disk\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {work / 'own.txt'} data/own.txt", str(after)], check=True)
    cmds: list[str] = []
    with before.open("rb") as a, after.open("rb") as b:
        for off in range(0, after.stat().st_size, BLOCK):
            x, y = a.read(BLOCK), b.read(BLOCK)
            if x != y:
                block = work / f"block-{off}"
                block.write_bytes(y)
                cmds += ["-c", f"write -s {block} {off} {BLOCK}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(overlay)], check=True, stdout=subprocess.DEVNULL)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layout = build_layout(work)
        rt = boxlite.Boxlite(boxlite.Options(home_dir=str(work / "home")))
        for name, own in (("image-data", False), ("own-data", True)):
            box = await rt.create(boxlite.BoxOptions(rootfs_path=str(layout), disk_size_gb=1), name=name)
            try:
                await box.start()
            except Exception as exc:  # no hardware virtualization: the disk exists all the same
                print(f"{name}: start failed ({exc}); exporting the created box", file=sys.stderr)
            if own:
                write_into_overlay(work / "home/boxes" / box.id / "disks/disk.qcow2", work)
            dest = HERE / f"{name}.boxlite"
            if dest.exists():
                os.unlink(dest)
            await box.export(dest=str(dest))


if __name__ == "__main__":
    asyncio.run(main())
