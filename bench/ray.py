"""The Ray pool's costs on a local three-node cluster (``tests/raycluster.py``) with the S3
server of the tests: what a handle's hop through Ray adds to an exec, and what "snapshot once,
fork anywhere" costs per step.

- ``ray_exec_local_ms``: ``Box.exec(["true"])`` in this process on a box of the pool (its home
  opened directly): the floor. ``ray_exec_handle_ms``: the same through a ``BoxRef`` from the
  driver; ``ray_exec_task_ms``: from a Ray task pinned to another node (task dispatch included).
- ``ray_create6_s``: ``create_many(6)``, six slim boxes of 128 MiB started at once (cold boots).
- ``ray_publish_s``: a snapshot exported once to ``s3://``; ``ray_fork4_s``: four started forks on
  two other nodes (one import per node, clones, boots); ``ray_fork_cached_ms``: one more fork, not
  started, on a node that already holds the import (a copy-on-write clone and nothing else).

Run alone: ``python -m bench.ray [--runs N]`` (home ``$BOXVM_BENCH_HOME`` or ``~/.boxvm``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import boxvm
from boxvm.paths import Home
from boxvm.ray import BoxPool, BoxRef
from tests.raycluster import ray_pool
from tests.s3server import BUCKET, environment, running

OPTS = boxvm.BoxOptions(image="boxvm/slim", cpus=1, memory_mib=128, network="none")


def _median_ms(call: object, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def run_once(pool: BoxPool, homes: Path, results: dict[str, list[float]]) -> None:
    t0 = time.monotonic()
    boxes = pool.create_many(6, OPTS)
    results["ray_create6_s"].append(round(time.monotonic() - t0, 1))
    box, other = boxes[0], next(b for b in boxes if b.node_id != boxes[0].node_id)

    async def local() -> float:
        async with boxvm.Runtime(homes / box.node_id[:12]) as rt:
            direct = await rt.get(box.id)
            assert direct is not None
            times = []
            for _ in range(20):
                t = time.perf_counter()
                await direct.exec(["true"])
                times.append((time.perf_counter() - t) * 1000)
            return round(statistics.median(times), 1)

    results["ray_exec_local_ms"].append(asyncio.run(local()))
    results["ray_exec_handle_ms"].append(_median_ms(lambda: box.exec(["true"]), 20))

    @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(other.node_id, soft=False))
    def task(target: BoxRef) -> int:
        return target.exec(["true"]).exit_code

    results["ray_exec_task_ms"].append(_median_ms(lambda: ray.get(task.remote(box)), 10))

    box.snapshot("base")
    t0 = time.monotonic()
    seed = pool.publish(box, f"s3://{BUCKET}/bench-ray/{uuid.uuid4().hex}.boxsnap", snapshot="base")
    results["ray_publish_s"].append(round(time.monotonic() - t0, 1))
    t0 = time.monotonic()
    forks = pool.fork(seed, 4, exclude=[box.node_id])
    results["ray_fork4_s"].append(round(time.monotonic() - t0, 1))
    t0 = time.monotonic()
    more = pool.fork(seed, 1, start=False, exclude=[box.node_id])
    results["ray_fork_cached_ms"].append(round((time.monotonic() - t0) * 1000))
    for b in [*boxes, *forks, *more]:
        b.remove(force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    home = Home.default(os.environ.get("BOXVM_BENCH_HOME"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    os.environ.update(environment(port))  # before the cluster starts: its runners inherit it
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "ray_exec_local_ms",
            "ray_exec_handle_ms",
            "ray_exec_task_ms",
            "ray_create6_s",
            "ray_publish_s",
            "ray_fork4_s",
            "ray_fork_cached_ms",
        )
    }
    with tempfile.TemporaryDirectory() as data, running(Path(data), port):
        homes = home.root / "bench-ray-nodes"
        with ray_pool(home, homes) as pool:
            for _ in range(args.runs):
                run_once(pool, homes, results)
    for key, values in results.items():
        print(f"{key:<22}{statistics.median(values):>10}  (min {min(values)}, max {max(values)})")


if __name__ == "__main__":
    main()
