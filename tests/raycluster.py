"""A local multi-node Ray cluster (``ray.cluster_utils.Cluster``) with a boxvm runner per node,
each over its own home seeded from a prepared one (hard links of the guest bundle and the slim
image): shared by tests/vm/test_ray.py and bench/ray.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from boxvm.backends.local import LocalBackend
from boxvm.guest import bundle
from boxvm.images.default import ensure_slim
from boxvm.paths import Home
from boxvm.ray import BoxPool


def clear(homes: Path) -> None:
    """Remove every box of every node home under ``homes`` (their VMs outlive a killed runner),
    then the homes."""

    async def remove_all(home: Home) -> None:
        backend = LocalBackend(home)
        for info in await backend.list():
            await backend.remove(info.id, force=True)
        await backend.close()

    for db in homes.glob("*/db"):
        asyncio.run(remove_all(Home(db.parent)))
    shutil.rmtree(homes, ignore_errors=True)


@contextlib.contextmanager
def ray_pool(
    home: Home, homes: Path, *, nodes: int = 3, cpus: int = 4, memory: int = 1 << 30, store: str | None = None
) -> Iterator[BoxPool]:
    """``nodes`` Ray nodes of ``cpus`` logical cpus and ``memory`` bytes, homes
    ``<homes>/<node id[:12]>``, and a pool over them. The runners inherit this process's
    environment (the AWS variables of the S3 server). Everything is removed afterwards."""
    clear(homes)  # an interrupted earlier run's
    bundle.ensure(home)
    ensure_slim(home)
    # No prestarted idle Python workers (Ray starts one per cpu of each node by default, each
    # importing Ray: seconds of CPU the boxes' boots need on a small machine).
    system = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
    head = {"num_cpus": cpus, "memory": memory, "include_dashboard": False, "_system_config": system}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus, memory=memory)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning")
        for node in (n["NodeID"] for n in ray.nodes() if n["Alive"]):
            node_home = Home(homes / node[:12])
            node_home.ensure()
            for src, dst in ((home.guest, node_home.guest), (home.images / "slim", node_home.images / "slim")):
                shutil.copytree(src, dst, copy_function=os.link, dirs_exist_ok=True)
        pool = BoxPool(str(homes / "{node}"), store=store)
        yield pool
        pool.shutdown(remove_boxes=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        clear(homes)
