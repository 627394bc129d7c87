"""A suspended box through an archive (issue 15): export with its memory state, import, and
the imported box's start (a resume) to its first exec, at a 512 MiB guest; plus the
archive's size against the RAM data it carries. The peer, in the same run: the export of the
same box stopped (its disk alone), so the ratio is what the memory adds."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import boxvm
from boxvm.engine import memory
from boxvm.paths import Home


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def run_memory_transfer(home: Home, runs: int, mib: int = 512) -> dict[str, list[float]]:
    label = f"{mib}m"
    out: dict[str, list[float]] = {
        f"suspended_export_{label}": [],
        f"suspended_import_{label}": [],
        f"imported_resume_to_exec_{label}": [],
        f"stopped_export_{label}": [],
    }
    sizes: list[str] = []
    async with boxvm.Runtime(home.root) as rt:
        box = await rt.create(boxvm.BoxOptions(memory_mib=mib), name=f"bench-memxfer-{os.getpid()}")
        try:
            await box.start()
            assert (await box.exec(["true"])).exit_code == 0
            await box.suspend()
            ram_mib = (home.box_dir(box.id) / memory.RAM).stat().st_blocks * 512 / (1 << 20)
            with tempfile.TemporaryDirectory(dir=home.tmp) as tmp:
                for i in range(runs):
                    dest = Path(tmp) / f"b{i}.boxsnap"
                    t = time.perf_counter()
                    await box.export(dest)
                    out[f"suspended_export_{label}"].append(ms(time.perf_counter() - t))
                    sizes.append(f"{dest.stat().st_size / (1 << 20):.1f}")
                    t = time.perf_counter()
                    copy = await rt.import_box(dest, name=f"bench-memxfer-copy-{os.getpid()}-{i}")
                    out[f"suspended_import_{label}"].append(ms(time.perf_counter() - t))
                    dest.unlink()
                    try:
                        t = time.perf_counter()
                        await copy.start()
                        assert (await copy.exec(["true"])).exit_code == 0
                        out[f"imported_resume_to_exec_{label}"].append(ms(time.perf_counter() - t))
                    finally:
                        await rt.remove(copy.id, force=True)
                await box.start()
                await box.stop()
                for i in range(runs):
                    dest = Path(tmp) / f"s{i}.boxsnap"
                    t = time.perf_counter()
                    await box.export(dest)
                    out[f"stopped_export_{label}"].append(ms(time.perf_counter() - t))
                    dest.unlink()
        finally:
            await rt.remove(box.id, force=True)
    print(f"suspended archive MiB ({label} guest, {ram_mib:.0f} MiB of RAM data): {', '.join(sizes)}")
    return out
