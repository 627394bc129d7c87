"""Export to and import from object storage (``s3://``) against boto3's own transfers of the
same bytes, in the same run, against a real S3 server (SeaweedFS on loopback, as in the tests).

Data: a 4 GiB box holding 256 MiB (half random, half files from /usr), as ``bench/archive.py``.
Export: ``box.export("s3://…")`` (capture + archive + streamed multipart upload) vs boto3's
``upload_file`` of that very archive (its TransferManager: 8 MiB parts, 10 threads). Import:
``rt.import_box("s3://…")`` (download streamed into the verifier, the disk written and
checked) vs boto3's ``download_file`` of the object to a local file. Throughput is archive
MB per second; the peak RSS growth of this process during the export shows the bounded memory.

``s3_export_file`` is the same export to a local file: producing the archive (flatten, hash,
zstd) on its own, which the upload overlaps. ``s3_import_file`` is the import of the same
archive from a local file: the verifier on its own, the floor of an import that overlaps the
download with it. Each run prints the host's load (1-minute average) beside its numbers.

Run alone: ``python -m bench.s3 [--runs N]`` (it prints the medians).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import boxvm
from bench.archive import fill_disk
from bench.rest import RssWatch
from boxvm import objstore
from boxvm.disks.layers import TOP
from boxvm.paths import Home
from tests.s3server import BUCKET, environment, running

MB = 1_000_000


async def run_s3(home: Home, runs: int) -> dict[str, list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    os.environ.update(environment(port))
    keys = ("s3_export", "s3_export_file", "s3_put", "s3_import", "s3_import_file", "s3_get", "s3_load_1min")
    results: dict[str, list[float]] = {k: [] for k in keys}
    for k in ("s3_export_mb_s", "s3_put_baseline_mb_s", "s3_import_mb_s", "s3_get_baseline_mb_s"):
        results[k] = []
    results["s3_export_rss_growth_mb"] = []
    with tempfile.TemporaryDirectory(dir=home.tmp) as tmp, running(Path(tmp), port) as server:
        client = server.client()
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
                for i in range(runs):
                    key = f"bench/{i}-{os.urandom(3).hex()}.boxsnap"
                    async with RssWatch(os.getpid()) as rss:
                        t0 = time.perf_counter()
                        url = await box.export(f"s3://{BUCKET}/{key}")
                        t_export = time.perf_counter() - t0
                    size = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
                    local = Path(tmp) / "archive.boxsnap"
                    t0 = time.perf_counter()
                    await box.export(local)  # what producing the archive costs, without the network
                    results["s3_export_file"].append(round((time.perf_counter() - t0) * 1000, 1))
                    local.unlink()
                    t0 = time.perf_counter()
                    await asyncio.to_thread(client.download_file, BUCKET, key, str(local))
                    t_get = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    await asyncio.to_thread(client.upload_file, str(local), BUCKET, key + ".plain")
                    t_put = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    copy = await rt.import_box(local)
                    t_import_file = time.perf_counter() - t0
                    await rt.remove(copy.id)
                    local.unlink()
                    t0 = time.perf_counter()
                    copy = await rt.import_box(str(url))
                    t_import = time.perf_counter() - t0
                    await rt.remove(copy.id)
                    for k, t in (
                        ("s3_export", t_export),
                        ("s3_put", t_put),
                        ("s3_import", t_import),
                        ("s3_import_file", t_import_file),
                        ("s3_get", t_get),
                    ):
                        results[k].append(round(t * 1000, 1))
                    results["s3_export_mb_s"].append(round(size / MB / t_export, 1))
                    results["s3_put_baseline_mb_s"].append(round(size / MB / t_put, 1))
                    results["s3_import_mb_s"].append(round(size / MB / t_import, 1))
                    results["s3_get_baseline_mb_s"].append(round(size / MB / t_get, 1))
                    results["s3_export_rss_growth_mb"].append(round(rss.growth / MB, 1))
                    results["s3_load_1min"].append(round(os.getloadavg()[0], 1))
                    print(
                        f"s3 run {i}: archive {size / MB:.0f} MB, export {t_export:.2f} s vs put {t_put:.2f} s, "
                        f"import {t_import:.2f} s (from a file {t_import_file:.2f} s) vs get {t_get:.2f} s "
                        f"({t_get / t_import:.2f}x), RSS +{rss.growth / MB:.0f} MB, load {results['s3_load_1min'][-1]}"
                    )
            finally:
                await rt.remove(box.id, force=True)
    return results


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
        f"import/get {med['s3_import_mb_s'] / med['s3_get_baseline_mb_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
