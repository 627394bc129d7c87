"""Export to and import from object storage (``s3://``) against boto3's own transfers of the
same bytes, in the same run, against a real S3 server (SeaweedFS on loopback, as in the tests).

Data: a 4 GiB box holding 256 MiB (half random, half files from /usr), as ``bench/archive.py``.
Export: ``box.export("s3://…")`` (capture + archive + streamed multipart upload) vs boto3's
``upload_file`` of an archive of the same box, the same size to a few bytes (its TransferManager:
8 MiB parts, 10 threads). Import: ``rt.import_box("s3://…")`` (download streamed into the
verifier, the disk written, synced and checked) vs boto3's ``download_file`` of that object to a
local file (TransferManager: 8 MiB ranged GETs, 10 threads; the file is not synced). Throughput is
archive MB per second; the peak RSS growth of this process during the export shows the bounded
memory.

Each pair (export and upload; import and download) runs back to back, its order alternating
from run to run, so both sides of a ratio meet the same host load and the same dirty page cache
(this host is shared: the load swings 2-3x within a minute). Beside each time, the CPU seconds
it cost: this process (every thread) plus the SeaweedFS server, the load-independent measure.

``s3_get_fsync``: the fsync of ``download_file``'s file after it (not in ``s3_get``): what a
download as durable as an import (which syncs its disk before the box exists) would add; the
settling before each step otherwise flushes those bytes outside any timing.

``s3_export_file`` is the same export to a local file: producing the archive (flatten, hash,
zstd) on its own, which the upload overlaps. ``s3_import_file`` is the import of the same
archive from a local file: the verifier on its own, the floor of an import that overlaps the
download with it. Each run prints the host's load (1-minute average) beside its numbers.

``s3_capped_*``: the same four steps through ``tests/throttle.py``, a proxy that serves each
connection at ``CAP`` bytes a second, as a remote store does (AWS S3 serves one at ~50-100
MB/s; scaled down so the proxy's own CPU stays small here). The import runs
``objstore._CONNECTIONS`` ranged GETs and the export as many parts at once
(``$BOXVM_S3_CONNECTIONS``: the proxy is on loopback, where they would otherwise run one GET
and 3 parts), as boto3's transfers run their ten connections.

Run alone: ``python -m bench.s3 [--runs N]`` (it prints the medians).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import boto3
import psutil

import boxvm
from bench.archive import fill_disk
from bench.rest import RssWatch
from boxvm import objstore
from boxvm.disks.layers import TOP, fsync_files
from boxvm.paths import Home
from tests.s3server import BUCKET, environment, running
from tests.throttle import Throttle

MB = 1_000_000
Results = dict[str, list[float]]
CAP = 40 * MB  # bytes a second per connection through the capped link


class Cost:
    """Wall seconds and CPU seconds (this process, every thread, plus the S3 server) of a block."""

    def __init__(self, server: psutil.Process) -> None:
        self.server = server

    def _cpu(self) -> tuple[float, float]:
        mine, theirs = resource.getrusage(resource.RUSAGE_SELF), self.server.cpu_times()
        return mine.ru_utime + mine.ru_stime, theirs.user + theirs.system

    def __enter__(self) -> Cost:
        self.t0, self.c0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        (mine, theirs), (mine0, theirs0) = self._cpu(), self.c0
        self.wall, self.mine, self.theirs = time.perf_counter() - self.t0, mine - mine0, theirs - theirs0
        self.cpu = self.mine + self.theirs

    def __str__(self) -> str:
        return f"{self.wall:.2f} s ({self.mine:.2f} + {self.theirs:.2f} CPU s)"


async def settle(server: psutil.Process) -> None:
    """Start a step once the step before is really over: its writeback synced and the S3
    server idle (SeaweedFS goes on working for a while after an upload, and that work made
    the CPU and time of whichever step came next, whatever it was, up to ~1 s higher)."""
    await asyncio.to_thread(os.sync)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = sum(server.cpu_times()[:2])
        await asyncio.sleep(0.2)
        if sum(server.cpu_times()[:2]) - before < 0.01:
            return


async def run_s3(home: Home, runs: int) -> dict[str, list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    os.environ.update(environment(port))
    keys = ("s3_export", "s3_export_file", "s3_put", "s3_import", "s3_import_file", "s3_get", "s3_get_fsync")
    keys += ("s3_load_1min",)
    results: dict[str, list[float]] = {k: [] for k in keys}
    for k in ("s3_export_mb_s", "s3_put_baseline_mb_s", "s3_import_mb_s", "s3_get_baseline_mb_s"):
        results[k] = []
    for k in ("s3_export_cpu_s", "s3_put_cpu_s", "s3_import_cpu_s", "s3_get_cpu_s"):
        results[k] = []
    results["s3_export_rss_growth_mb"] = []
    with tempfile.TemporaryDirectory(dir=home.tmp) as tmp, running(Path(tmp), port) as server:
        client = server.client()
        seaweed = psutil.Process(server.pid)
        # warm up: SeaweedFS grows its first volumes on the first writes, and boxvm's first
        # upload imports boto3 and builds its client; neither belongs to a run
        for i in range(4):
            await asyncio.to_thread(client.put_object, Bucket=BUCKET, Key=f"warmup/{i}", Body=os.urandom(32 << 20))

        async def tiny() -> AsyncIterator[bytes]:
            yield b"warm"

        await objstore.upload(tiny(), objstore.parse(f"s3://{BUCKET}/warmup/boxvm"), None)
        async with boxvm.Runtime(home.root) as rt:
            box = await rt.create(name=f"bench-s3-{os.urandom(2).hex()}")
            try:
                fill_disk(home.box_dir(box.id) / TOP, Path(tmp), 128, 128)
                local = Path(tmp) / "archive.boxsnap"
                await box.export(local)  # what the first upload sends; later ones send the run before's download
                for i in range(runs):
                    key = f"bench/{i}-{os.urandom(3).hex()}.boxsnap"
                    url = f"s3://{BUCKET}/{key}"
                    export, put, put_size = Cost(seaweed), Cost(seaweed), local.stat().st_size

                    async def do_export(cost: Cost = export, url: str = url) -> None:
                        async with RssWatch(os.getpid()) as rss:
                            with cost:
                                await box.export(url)
                        results["s3_export_rss_growth_mb"].append(round(rss.growth / MB, 1))

                    async def do_put(cost: Cost = put, key: str = key) -> None:
                        with cost:
                            await asyncio.to_thread(client.upload_file, str(local), BUCKET, key + ".plain")

                    for step in (do_export, do_put) if i % 2 == 0 else (do_put, do_export):
                        await settle(seaweed)
                        await step()
                    size = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
                    local.unlink()
                    exported = Path(tmp) / "export.boxsnap"
                    t0 = time.perf_counter()
                    await box.export(exported)  # what producing the archive costs, without the network
                    results["s3_export_file"].append(round((time.perf_counter() - t0) * 1000, 1))
                    exported.unlink()
                    imp, get = Cost(seaweed), Cost(seaweed)

                    async def do_import(cost: Cost = imp, url: str = url) -> None:
                        with cost:
                            copy = await rt.import_box(url)
                        await rt.remove(copy.id)

                    async def do_get(cost: Cost = get, key: str = key) -> None:
                        with cost:
                            await asyncio.to_thread(client.download_file, BUCKET, key, str(local))
                        t0 = time.perf_counter()  # what making it durable would add, as the import does
                        await asyncio.to_thread(fsync_files, [local])
                        results["s3_get_fsync"].append(round((time.perf_counter() - t0) * 1000, 1))

                    for step in (do_get, do_import) if i % 2 == 0 else (do_import, do_get):
                        await settle(seaweed)
                        await step()
                    t0 = time.perf_counter()
                    copy = await rt.import_box(local)
                    t_import_file = time.perf_counter() - t0
                    await rt.remove(copy.id)
                    for k, cost in (("s3_export", export), ("s3_put", put), ("s3_import", imp), ("s3_get", get)):
                        results[k].append(round(cost.wall * 1000, 1))
                        results[f"{k}_cpu_s"].append(round(cost.cpu, 2))
                    results["s3_import_file"].append(round(t_import_file * 1000, 1))
                    results["s3_export_mb_s"].append(round(size / MB / export.wall, 1))
                    results["s3_put_baseline_mb_s"].append(round(put_size / MB / put.wall, 1))
                    results["s3_import_mb_s"].append(round(size / MB / imp.wall, 1))
                    results["s3_get_baseline_mb_s"].append(round(size / MB / get.wall, 1))
                    results["s3_load_1min"].append(round(os.getloadavg()[0], 1))
                    print(
                        f"s3 run {i}: archive {size / MB:.0f} MB, export {export} vs put {put}, import {imp} "
                        f"(from a file {t_import_file:.2f} s) vs get {get} "
                        f"= {get.wall / imp.wall:.2f}x, RSS +{results['s3_export_rss_growth_mb'][-1]:.0f} MB, "
                        f"load {results['s3_load_1min'][-1]}",
                        flush=True,
                    )
                await capped(box, rt, port, seaweed, Path(tmp), max(2, runs // 3), results)
            finally:
                await rt.remove(box.id, force=True)
    return results


async def capped(
    box: boxvm.Box, rt: boxvm.Runtime, port: int, seaweed: psutil.Process, tmp: Path, runs: int, results: Results
) -> None:
    """``runs`` pairs of each step through a link capped at ``CAP`` a connection (module doc)."""
    local = tmp / "capped.boxsnap"
    remote = {objstore.CONNECTIONS_ENV: str(objstore._CONNECTIONS)}  # the link stands for a store on another host
    with Throttle(port, CAP) as link, mock.patch.dict(os.environ, AWS_ENDPOINT_URL=link.url, **remote):
        client = boto3.client("s3", endpoint_url=link.url)

        async def step(name: str, key: str) -> boxvm.Box | None:
            if name == "s3_capped_export":
                await box.export(f"s3://{BUCKET}/{key}")
            elif name == "s3_capped_put":
                await asyncio.to_thread(client.upload_file, str(local), BUCKET, key + ".plain")
            elif name == "s3_capped_import":
                return await rt.import_box(f"s3://{BUCKET}/{key}")
            else:
                await asyncio.to_thread(client.download_file, BUCKET, key, str(tmp / "got"))
            return None

        for i in range(runs):
            key = f"capped/{i}-{os.urandom(3).hex()}.boxsnap"
            await box.export(local)
            pairs = [("s3_capped_export", "s3_capped_put"), ("s3_capped_import", "s3_capped_get")]
            walls = {}
            for name in (n for pair in pairs for n in (pair if i % 2 == 0 else pair[::-1])):
                await settle(seaweed)
                cost = Cost(seaweed)
                with cost:
                    made = await step(name, key)
                walls[name] = cost.wall
                if made is not None:
                    await rt.remove(made.id)
            size = local.stat().st_size
            local.unlink()
            (tmp / "got").unlink()
            for name, wall in walls.items():
                results.setdefault(name, []).append(round(wall * 1000, 1))
                mb_s = name.replace("_put", "_put_baseline").replace("_get", "_get_baseline") + "_mb_s"
                results.setdefault(mb_s, []).append(round(size / MB / wall, 1))
            print(
                f"s3 capped run {i} ({CAP / MB:.0f} MB/s a connection): export {walls['s3_capped_export']:.2f} s "
                f"vs put {walls['s3_capped_put']:.2f} s, import {walls['s3_capped_import']:.2f} s vs get "
                f"{walls['s3_capped_get']:.2f} s, up to {link.peak} connections",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    home = Home.default(os.environ.get("BOXVM_BENCH_HOME"))
    results = asyncio.run(run_s3(home, args.runs))
    for key, values in results.items():
        print(f"{key:<28}{statistics.median(values):>10}  (min {min(values)}, max {max(values)})")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"export/put {med['s3_export_mb_s'] / med['s3_put_baseline_mb_s']:.2f}x, "
        f"import/get {med['s3_import_mb_s'] / med['s3_get_baseline_mb_s']:.2f}x "
        f"(/get+fsync {(med['s3_get'] + med['s3_get_fsync']) / med['s3_import']:.2f}x); capped link: "
        f"export/put {med['s3_capped_export_mb_s'] / med['s3_capped_put_baseline_mb_s']:.2f}x, "
        f"import/get {med['s3_capped_import_mb_s'] / med['s3_capped_get_baseline_mb_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
