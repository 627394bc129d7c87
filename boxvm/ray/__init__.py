"""boxvm on a Ray cluster (extra ``boxvm[ray]``): a runner actor per node owns the node's boxes,
``BoxPool`` places boxes by free capacity, ``BoxRef`` handles work from any Ray task, and a
snapshot published to object storage is imported once per node and forked there copy-on-write.
See docs/CLUSTER.md.

Ray itself is imported with the pool, on first use of ``BoxPool``/``BoxRef``/``Seed`` (PEP 562):
the errors and the placement plan work without it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from boxvm.ray.errors import NoCapacity, RunnerUnavailable
from boxvm.ray.runner import NodeLoad

if TYPE_CHECKING:
    from boxvm.ray.pool import BoxPool, BoxRef, Seed

__all__ = ["BoxPool", "BoxRef", "NoCapacity", "NodeLoad", "RunnerUnavailable", "Seed"]


def __getattr__(name: str) -> Any:
    if name in ("BoxPool", "BoxRef", "Seed"):
        from boxvm.ray import pool

        return getattr(pool, name)
    raise AttributeError(f"module 'boxvm.ray' has no attribute {name!r}")
