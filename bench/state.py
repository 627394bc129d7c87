"""State-operation benchmarks: snapshot, restore, remove and clone, their cost at two
disk sizes, a batch of 100 clones, the guest-visible pause of live captures, and our
in-process overlay writer against ``qemu-img create`` measured in the same run."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path

import boxvm
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP
from boxvm.paths import Home


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def overlay_writer_vs_qemu_img(work: Path, runs: int) -> dict[str, list[float]]:
    base = work / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4G"], check=True)
    ours, theirs = [], []
    for i in range(runs):
        t = time.perf_counter()
        qcow2.write_overlay(work / f"ours-{i}.qcow2", 4 << 30, "base.qcow2")
        ours.append(ms(time.perf_counter() - t))
        t = time.perf_counter()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"theirs-{i}.qcow2"],
            cwd=work,
            check=True,
        )
        theirs.append(ms(time.perf_counter() - t))
    return {"overlay_write_inprocess": ours, "overlay_write_qemu_img": theirs}


async def fill(rt: boxvm.Runtime, box: boxvm.Box, nbytes: int) -> None:
    """Allocate ``nbytes`` in the stopped box's top layer (host-side qemu-io: far faster than
    writing from a TCG guest). The box is a benchmark subject only and is never booted."""
    top = rt.backend.home.box_dir(box.id) / TOP  # type: ignore[attr-defined]
    chunk = 256 << 20
    cmds = []
    for off in range(0, nbytes, chunk):
        cmds += ["-c", f"write -P 0x5c {(1 << 30) + off} {min(chunk, nbytes - off)}"]
    subprocess.run(["qemu-io", *cmds, str(top)], check=True, capture_output=True)


async def stopped_ops(rt: boxvm.Runtime, label: str, nbytes: int, runs: int) -> dict[str, list[float]]:
    box = await rt.create(boxvm.BoxOptions(disk_size_gb=4), name=f"bench-{label}")
    await fill(rt, box, nbytes)
    out: dict[str, list[float]] = {f"snapshot_create_{label}": [], f"snapshot_restore_{label}": []}
    out[f"snapshot_remove_{label}"] = []
    out[f"clone_{label}"] = []
    out[f"clone_from_snapshot_{label}"] = []
    try:
        for i in range(runs):
            t = time.perf_counter()
            await box.snapshot.create(f"s{i}")
            out[f"snapshot_create_{label}"].append(ms(time.perf_counter() - t))
            t = time.perf_counter()
            await box.snapshot.restore(f"s{i}")
            out[f"snapshot_restore_{label}"].append(ms(time.perf_counter() - t))
            t = time.perf_counter()
            c = await box.clone(f"bench-{label}-c{i}")
            out[f"clone_{label}"].append(ms(time.perf_counter() - t))
            t = time.perf_counter()
            c2 = await box.clone(f"bench-{label}-d{i}", boxvm.CloneOptions(from_snapshot=f"s{i}"))
            out[f"clone_from_snapshot_{label}"].append(ms(time.perf_counter() - t))
            await rt.remove(c.id)
            await rt.remove(c2.id)
            t = time.perf_counter()
            await box.snapshot.remove(f"s{i}")
            out[f"snapshot_remove_{label}"].append(ms(time.perf_counter() - t))
    finally:
        await rt.remove(box.id, force=True)
    return out


async def batch_clones(rt: boxvm.Runtime, runs: int) -> dict[str, list[float]]:
    box = await rt.create(name="bench-batch")
    await box.snapshot.create("gold")
    times = []
    try:
        for _ in range(runs):
            t = time.perf_counter()
            clones = await box.clone_many(100, boxvm.CloneOptions(from_snapshot="gold"))
            times.append(ms(time.perf_counter() - t))
            for c in clones:
                await rt.remove(c.id)
    finally:
        await rt.remove(box.id, force=True)
    return {"clone_batch_100": times}


async def live_pauses(rt: boxvm.Runtime, runs: int, disk_gb: int) -> dict[str, list[float]]:
    """Guest-visible pause (measured by the guest: freeze start to thaw end) of live
    snapshots and clones, with a writer running in the box."""
    box = await rt.create(boxvm.BoxOptions(disk_size_gb=disk_gb), name=f"bench-live-{disk_gb}g")
    out: dict[str, list[float]] = {f"live_snapshot_pause_{disk_gb}g": [], f"live_clone_pause_{disk_gb}g": []}
    out[f"live_snapshot_host_{disk_gb}g"] = []
    try:
        await box.start()
        writer = await box.spawn(["sh", "-c", "while true; do date >> /root/log; sleep 0.05; done"])
        for i in range(runs):
            snap = await box.snapshot.create(f"live{i}")
            out[f"live_snapshot_pause_{disk_gb}g"].append(snap.timings["pause_ms"])
            out[f"live_snapshot_host_{disk_gb}g"].append(snap.timings["capture_ms"])
            clone = await box.clone(f"bench-live-{disk_gb}g-c{i}")
            out[f"live_clone_pause_{disk_gb}g"].append((await clone.info()).timings["pause_ms"])
            await rt.remove(clone.id)
            await box.snapshot.remove(f"live{i}")
        writer.kill()
        await writer.wait()
    finally:
        await rt.remove(box.id, force=True)
    return out


async def run_state(home: Home, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    with home.staging("bench-qcow2-") as work:
        results.update(overlay_writer_vs_qemu_img(work, max(runs, 20)))
    async with boxvm.Runtime(home.root) as rt:
        results.update(await stopped_ops(rt, "64m", 64 << 20, runs))
        results.update(await stopped_ops(rt, "2g", 2 << 30, runs))
        results.update(await batch_clones(rt, max(1, runs // 4)))
        results.update(await live_pauses(rt, runs, 4))
        results.update(await live_pauses(rt, runs, 64))
    return results


def medians(results: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in results.items()}


if __name__ == "__main__":
    print(asyncio.run(run_state(Home.default(), 5)))
