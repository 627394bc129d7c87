"""The operation namespaces of the box protocol (``guest/protocol.py``)."""

from __future__ import annotations

from boxvm.engine.supervisor import Supervisor
from boxvm.guest import protocol as P


def test_the_namespaces_are_separate() -> None:
    assert not P.SUPERVISOR_OPS & P.AGENT_OPS
    assert P.CLIENT_AGENT_OPS < P.AGENT_OPS
    assert not {"freeze", "thaw", "shutdown"} & P.CLIENT_AGENT_OPS


def test_every_supervisor_operation_has_a_handler_and_no_handler_is_unlisted() -> None:
    handlers = {name.removeprefix("op_") for name in dir(Supervisor) if name.startswith("op_")}
    assert handlers == P.SUPERVISOR_OPS
