"""Export and import of a ~1 GiB box through a real ``boxvm serve`` vs the same operations
locally, and how much the server's resident memory grows while it streams them.

The server runs as its own process (uvicorn, loopback, a token) over the same home; its
RSS is sampled every 20 ms during each operation and compared with its RSS just before.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import psutil

import boxvm
from bench.archive import fill_disk
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP
from boxvm.paths import Home
from tests.helpers import serving

TOKEN = "bench-" + os.urandom(8).hex()


class RssWatch:
    """Peak RSS growth of a process over a block, sampled from a background task."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.growth = 0

    async def __aenter__(self) -> RssWatch:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self.task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.growth = self.peak - self.start


async def run_rest(home: Home, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        k: [] for k in ("export_local", "export_rest", "import_local", "import_rest")
    } | {"server_rss_growth_export_mb": [], "server_rss_growth_import_mb": []}
    with serving(home, TOKEN) as (url, server_pid):
        async with boxvm.Runtime(home.root) as local, boxvm.Runtime.remote(url, token=TOKEN) as remote:
            box = await local.create(boxvm.BoxOptions(disk_size_gb=4), name="bench-rest")
            work = home.staging_dir("bench-rest-")
            try:
                top = home.box_dir(box.id) / TOP
                fill_disk(top, work, 512, 512)
                print(f"bench-rest: {qcow2.flatten_plan(top).data_bytes / 1e6:.0f} MB of allocated data")
                rbox = await remote.get(box.id)
                assert rbox is not None
                for i in range(runs):
                    for kind, rt, b in (("local", local, box), ("rest", remote, rbox)):
                        dest = work / f"{kind}-{i}.boxsnap"
                        async with RssWatch(server_pid) as watch:
                            t = time.perf_counter()
                            await b.export(dest)
                            results[f"export_{kind}"].append(round((time.perf_counter() - t) * 1000, 1))
                        if kind == "rest":
                            results["server_rss_growth_export_mb"].append(round(watch.growth / 1e6, 1))
                        async with RssWatch(server_pid) as watch:
                            t = time.perf_counter()
                            imported = await rt.import_box(dest, name=f"bench-rest-{kind}-{i}")
                            results[f"import_{kind}"].append(round((time.perf_counter() - t) * 1000, 1))
                        if kind == "rest":
                            results["server_rss_growth_import_mb"].append(round(watch.growth / 1e6, 1))
                        await local.remove(imported.id)
                        dest.unlink()
            finally:
                await local.remove(box.id, force=True)
                shutil.rmtree(work, ignore_errors=True)
    return results
