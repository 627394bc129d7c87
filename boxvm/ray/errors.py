"""The errors of the Ray pool: subclasses of boxvm's own, so ``except EngineError`` still holds.

They cross Ray (pickled) from a runner to any caller, so they live apart from Ray's imports."""

from __future__ import annotations

from boxvm.errors import EngineError


class RunnerUnavailable(EngineError):
    """The boxvm runner of a box's Ray node is gone (killed, crashed, or its node left): the
    box cannot be reached until a runner is started on that node again."""


class NoCapacity(EngineError):
    """No live node has the cpus and memory a box needs (503: retry later, or free boxes)."""
