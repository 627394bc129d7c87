"""Migration time of a stopped box holding 1 GiB of data (half random, half files from /usr)
to a second ``boxvm serve`` with its own home on loopback, directly (``boxvm.migrate``
without ``via``: the export streamed into the target's REST import, then the source's copy
removed) and through SeaweedFS on loopback (export to the bucket, remove, server-side
import, delete the object), the two ways interleaved in each run (their order alternating),
with the plain transfer of the same archive (boto3 upload_file + download_file) beside them.

Run alone: ``python -m bench.migrate [--runs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import boxvm
from bench.archive import fill_disk
from boxvm.disks.layers import TOP
from boxvm.migrate import migrate
from boxvm.paths import Home
from tests.helpers import serving
from tests.s3server import BUCKET, environment, running

TOKEN = "bench-" + os.urandom(8).hex()


async def run_migrate(home: Home, runs: int) -> dict[str, list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    os.environ.update(environment(port), BOXVM_REST_OBJECTS=f"s3://{BUCKET}/moves/")
    results: dict[str, list[float]] = {"migrate_1g": [], "migrate_1g_direct": [], "migrate_1g_plain_transfer": []}
    with tempfile.TemporaryDirectory(dir=home.tmp) as tmp, running(Path(tmp), port) as server:
        other = Home.default(Path(tmp) / "target-home")
        other.ensure()
        shutil.rmtree(other.guest)
        shutil.copytree(home.guest, other.guest, copy_function=os.link)
        client = server.client()
        with serving(other, TOKEN) as (url, _pid):
            async with boxvm.Runtime(home.root) as rt, boxvm.Runtime.remote(url, token=TOKEN) as target:
                for i in range(runs):
                    boxes = []
                    for way in ("direct", "bucket"):  # the same data in each
                        boxes.append(await rt.create(name=f"bench-mig-{way}-{i}-{os.urandom(2).hex()}"))
                        fill_disk(home.box_dir(boxes[-1].id) / TOP, Path(tmp), 512, 512)
                    box = boxes[1]
                    archive = Path(tmp) / "plain.boxsnap"
                    await box.export(archive)
                    t0 = time.perf_counter()
                    await asyncio.to_thread(client.upload_file, str(archive), BUCKET, f"plain/{i}")
                    await asyncio.to_thread(client.download_file, BUCKET, f"plain/{i}", str(archive) + ".back")
                    results["migrate_1g_plain_transfer"].append(round((time.perf_counter() - t0) * 1000, 1))
                    size = archive.stat().st_size
                    archive.unlink()
                    Path(str(archive) + ".back").unlink()
                    ways = [("migrate_1g_direct", boxes[0], None), ("migrate_1g", boxes[1], f"s3://{BUCKET}/moves/")]
                    for key, moving, via in ways if i % 2 == 0 else ways[::-1]:
                        t0 = time.perf_counter()
                        moved = await migrate(rt.backend, moving.name, target.backend, via)
                        results[key].append(round((time.perf_counter() - t0) * 1000, 1))
                        await target.remove(moved.id)
                    took, direct = results["migrate_1g"][-1] / 1000, results["migrate_1g_direct"][-1] / 1000
                    plain = results["migrate_1g_plain_transfer"][-1] / 1000
                    print(
                        f"migrate run {i}: archive {size / 1e6:.0f} MB, direct {direct:.1f} s, through the bucket"
                        f" {took:.1f} s; plain transfer {plain:.1f} s; load {os.getloadavg()}"
                    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    results = asyncio.run(run_migrate(Home.default(os.environ.get("BOXVM_BENCH_HOME")), args.runs))
    for key, values in results.items():
        print(f"{key:<28}{statistics.median(values):>10.0f} ms  (min {min(values):.0f}, max {max(values):.0f})")


if __name__ == "__main__":
    main()
