"""The pool's placement plan (``boxvm.ray.placement``), without Ray or VMs."""

from __future__ import annotations

import pytest

from boxvm.errors import EngineError
from boxvm.ray import NoCapacity, NodeLoad
from boxvm.ray.placement import plan


def load(node: str, used_cpus: float, used_mib: int = 0, cpus: float = 4, mib: int = 1024) -> NodeLoad:
    return NodeLoad(node, cpus, mib, used_cpus, used_mib, 0)


def test_boxes_spread_evenly_and_fill_the_emptiest_node_first() -> None:
    assert plan([load("a", 0), load("b", 0), load("c", 0)], 1, 128, 6) == {"a": 2, "b": 2, "c": 2}
    assert plan([load("a", 3), load("b", 1), load("c", 2)], 1, 128, 3) == {"b": 2, "c": 1}


def test_memory_binds_as_cpus_do() -> None:
    # b has the most free cpus but room for one 512 MiB box only.
    assert plan([load("a", 2), load("b", 0, used_mib=512)], 1, 512, 3) == {"b": 1, "a": 2}


def test_what_does_not_fit_anywhere_is_refused_whole() -> None:
    with pytest.raises(NoCapacity, match="2 more box") as caught:
        plan([load("a", 3), load("b", 4)], 1, 128, 3)
    assert isinstance(caught.value, EngineError)
    with pytest.raises(NoCapacity, match="free: none"):
        plan([], 1, 128, 1)
