"""Memory-state benchmarks (issue 15) at 512 MiB and 2 GiB guests: suspend, resume to the
first exec (against a cold start to the first exec in the same run), and the guest pause of a
memory snapshot of a running box (a pre-copy while it runs where the kernel tracks soft-dirty
pages); plus what is saved (device state, RAM data) and the RSS of a resumed QEMU."""

from __future__ import annotations

import os
import time

import psutil

import boxvm
from boxvm.engine import memory, memory_precopy
from boxvm.paths import Home


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _first_exec(box: boxvm.Box) -> None:
    result = await box.exec(["true"])
    assert result.exit_code == 0, result


async def one_size(rt: boxvm.Runtime, home: Home, mib: int, runs: int) -> dict[str, list[float]]:
    label = "2g" if mib >= 2048 else f"{mib}m"
    out: dict[str, list[float]] = {
        f"cold_start_to_exec_{label}": [],
        f"suspend_{label}": [],
        f"resume_to_exec_{label}": [],
        f"memory_snapshot_pause_{label}": [],
        f"memory_snapshot_{label}": [],
    }
    sizes: dict[str, list[float]] = {f"device_state_kib_{label}": [], f"ram_data_mib_{label}": []}
    sizes[f"resumed_qemu_rss_mib_{label}"] = []
    box = await rt.create(boxvm.BoxOptions(memory_mib=mib), name=f"bench-memory-{label}-{os.getpid()}")
    box_dir = home.box_dir(box.id)
    try:
        t = time.perf_counter()
        await box.start()
        await _first_exec(box)
        out[f"cold_start_to_exec_{label}"].append(ms(time.perf_counter() - t))
        for i in range(runs):
            t = time.perf_counter()
            snap = await box.snapshot.create(f"m{i}", boxvm.SnapshotOptions(memory=True))
            out[f"memory_snapshot_{label}"].append(ms(time.perf_counter() - t))
            out[f"memory_snapshot_pause_{label}"].append(snap.timings["pause_ms"])
            await box.snapshot.remove(f"m{i}")
            t = time.perf_counter()
            await box.suspend()
            out[f"suspend_{label}"].append(ms(time.perf_counter() - t))
            sizes[f"device_state_kib_{label}"].append((box_dir / memory.STATE).stat().st_size / 1024)
            sizes[f"ram_data_mib_{label}"].append((box_dir / memory.RAM).stat().st_blocks * 512 / (1 << 20))
            t = time.perf_counter()
            await box.start()
            await _first_exec(box)
            out[f"resume_to_exec_{label}"].append(ms(time.perf_counter() - t))
            rec = rt.backend.store.get_box(box.id)  # type: ignore[attr-defined]
            if rec is not None and rec.qemu_pid:
                rss = psutil.Process(rec.qemu_pid).memory_info().rss
                sizes[f"resumed_qemu_rss_mib_{label}"].append(rss / (1 << 20))
        await box.stop()
        t = time.perf_counter()
        await box.start()
        await _first_exec(box)
        out[f"cold_start_to_exec_{label}"].append(ms(time.perf_counter() - t))
    finally:
        await rt.remove(box.id, force=True)
    for key, values in sizes.items():
        print(f"{key}: {', '.join(f'{v:.1f}' for v in values)}")
    # Without soft-dirty the RAM is copied whole while the guest is stopped (no pre-copy).
    print(f"soft-dirty pre-copy: {'yes' if memory_precopy.supported() else 'no (the kernel lacks it)'}")
    return out


async def run_memory(home: Home, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    async with boxvm.Runtime(home.root) as rt:
        for mib in (512, 2048):
            results.update(await one_size(rt, home, mib, runs))
    return results
