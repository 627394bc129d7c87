"""Export/import throughput against the physical single-pass cost of the same bytes, and the
guest-visible pause of a running-box export at two disk sizes.

Baselines run in the same process on the same data extents: export vs one thread reading
the allocated clusters once through ``hashlib.sha256`` and ``zstandard`` level 3; import vs
one thread decompressing, hashing and writing (with fsync) the same disk member.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import tarfile
import time
from pathlib import Path

import zstandard

import boxvm
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP

MIB = 1 << 20


def make_data(raw: Path, size: int, random_mib: int, files_mib: int) -> None:
    """Half random bytes, half real files from this host's /usr, at 1 GiB into a sparse disk."""
    with raw.open("wb") as f:
        f.truncate(size)
        f.seek(1 << 30)
        for _ in range(random_mib):
            f.write(os.urandom(MIB))
        left = files_mib * MIB
        for root in ("/usr/lib", "/usr/share"):
            for dirpath, _dirs, names in os.walk(root):
                for name in names:
                    p = os.path.join(dirpath, name)
                    if left <= 0 or os.path.islink(p) or not os.path.isfile(p):
                        continue
                    try:
                        data = Path(p).read_bytes()[:left]
                    except OSError:
                        continue
                    f.write(data)
                    left -= len(data)
            if left <= 0:
                break


def fill_disk(top: Path, work: Path, random_mib: int, files_mib: int) -> None:
    """Write ``make_data`` into a (4 GiB) box disk, allocated as a guest would have."""
    raw = work / "data.raw"
    make_data(raw, 4 << 30, random_mib, files_mib)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(top)], check=True)
    raw.unlink()


def baseline_export(top: Path) -> float:
    """Seconds for one thread to read the allocated data once, hash it and zstd it (level 3)."""
    plan = qcow2.flatten_plan(top)
    h = hashlib.sha256()
    comp = zstandard.ZstdCompressor(level=3).compressobj()
    t = time.perf_counter()
    for chunk in plan.chunks():
        h.update(chunk)
        comp.compress(chunk)
    comp.flush()
    return time.perf_counter() - t


def baseline_import(archive: Path, work: Path) -> float:
    """Seconds for one thread to decompress the archive, hash its disk member and write it."""
    t = time.perf_counter()
    with archive.open("rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                src = tar.extractfile(member)
                assert src is not None
                h = hashlib.sha256()
                with (work / f"baseline-{member.name}").open("wb") as out:
                    while chunk := src.read(MIB):
                        h.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
    return time.perf_counter() - t


async def run_archive(
    home_root: Path, runs: int, random_mib: int = 256, files_mib: int = 256
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "export_mb_s": [], "export_baseline_mb_s": [], "import_mb_s": [], "import_baseline_mb_s": [],
    }  # fmt: skip
    async with boxvm.Runtime(home_root) as rt:
        # Pauses first, on a quiet host: right after the throughput runs below, the host is
        # still writing out hundreds of MB, which lengthens the guest's flush during FIFREEZE.
        for disk_gb in (4, 64):
            results[f"live_export_pause_{disk_gb}g"] = []
            results[f"live_export_release_ms_{disk_gb}g"] = []
            live = await rt.create(boxvm.BoxOptions(disk_size_gb=disk_gb), name=f"bench-live-export-{disk_gb}g")
            try:
                await live.start()
                writer = await live.spawn(["sh", "-c", "while true; do date >> /root/log; sleep 0.05; done"])
                depth, last = (await live.info()).chain_depth, None
                for i in range(runs):
                    dest = rt.backend.home.tmp / f"bench-live-{disk_gb}-{i}.boxsnap"  # type: ignore[attr-defined]
                    dest.unlink(missing_ok=True)  # left by an interrupted run
                    await live.export(dest)
                    results[f"live_export_pause_{disk_gb}g"].append((await live.info()).timings["pause_ms"])
                    # the capture is released in the background; the next capture would wait for it
                    while (info := await live.info()).chain_depth != depth or info.timings.get("release_ms") == last:
                        await asyncio.sleep(0.01)
                    last = info.timings["release_ms"]
                    results[f"live_export_release_ms_{disk_gb}g"].append(last)
                    dest.unlink()
                writer.kill()
                await writer.wait()
            finally:
                await rt.remove(live.id, force=True)
        home = rt.backend.home  # type: ignore[attr-defined]
        work = home.staging_dir("bench-archive-")
        box = await rt.create(boxvm.BoxOptions(disk_size_gb=4), name="bench-archive")
        try:
            top = home.box_dir(box.id) / TOP
            fill_disk(top, work, random_mib, files_mib)
            data_mb = qcow2.flatten_plan(top).data_bytes / 1e6
            for i in range(runs):
                dest = work / f"e{i}.boxsnap"
                t = time.perf_counter()
                await box.export(dest)
                results["export_mb_s"].append(round(data_mb / (time.perf_counter() - t), 1))
                results["export_baseline_mb_s"].append(round(data_mb / baseline_export(top), 1))
                t = time.perf_counter()
                imported = await rt.import_box(dest, name=f"bench-archive-i{i}")
                results["import_mb_s"].append(round(data_mb / (time.perf_counter() - t), 1))
                results["import_baseline_mb_s"].append(round(data_mb / baseline_import(dest, work), 1))
                results.setdefault("archive_load_1min", []).append(round(os.getloadavg()[0], 1))
                print(
                    f"archive run {i}: export {results['export_mb_s'][-1]} MB/s "
                    f"(baseline {results['export_baseline_mb_s'][-1]}), import {results['import_mb_s'][-1]} MB/s "
                    f"(baseline {results['import_baseline_mb_s'][-1]}), load {results['archive_load_1min'][-1]}"
                )
                await rt.remove(imported.id)
                for p in work.glob("baseline-*"):
                    p.unlink()
                dest.unlink()
        finally:
            await rt.remove(box.id, force=True)
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return results
