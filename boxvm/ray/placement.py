"""Where new boxes go: the pure planning step of the pool, apart from Ray so it is tested alone."""

from __future__ import annotations

from collections.abc import Iterable

from boxvm.ray.errors import NoCapacity
from boxvm.ray.runner import NodeLoad


def plan(loads: Iterable[NodeLoad], cpus: float, memory_mib: int, count: int) -> dict[str, int]:
    """How many of ``count`` boxes of ``cpus``/``memory_mib`` to place on each node: one at a
    time on the node with the most free cpus (then memory, then id for a stable order), so
    boxes spread evenly and a full node is never chosen. NoCapacity when they do not all fit."""
    free = {load.node_id: [load.free_cpus, load.free_memory_mib] for load in loads}
    placed: dict[str, int] = {}
    for _ in range(count):
        fitting = [node for node, (c, m) in free.items() if c >= cpus and m >= memory_mib]
        if not fitting:
            room = ", ".join(f"{node[:12]}: {c:g} cpus {m} MiB" for node, (c, m) in sorted(free.items())) or "none"
            raise NoCapacity(
                f"no live Ray node has room for {count - sum(placed.values())} more box(es) of {cpus:g} cpu(s) and "
                f"{memory_mib} MiB (free: {room}): stop or remove boxes, or add nodes"
            )
        node = max(fitting, key=lambda n: (free[n][0], free[n][1], n))
        free[node][0] -= cpus
        free[node][1] -= memory_mib
        placed[node] = placed.get(node, 0) + 1
    return placed
