"""The guest agent is PID 1: what the host port gives it must not end it (its exit panics
the guest's kernel and the box dies). Run here on a FIFO standing for the virtio port."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

GUEST = Path(__file__).resolve().parents[2] / "boxvm" / "guest"


@pytest.fixture
def agent_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The agent's module; what its constructor sets process-wide (the signal wake-up fd, a
    SIGCHLD handler: the event loops of this process use them) is put back after."""
    monkeypatch.syspath_prepend(str(GUEST))  # the agent imports its protocol as the guest has it
    import agent

    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    sigchld = signal.getsignal(signal.SIGCHLD)
    try:
        yield agent
    finally:
        signal.set_wakeup_fd(wakeup)
        signal.signal(signal.SIGCHLD, sigchld)
        sys.modules.pop("agent", None)
        sys.modules.pop("protocol", None)


def test_a_garbled_header_is_dropped_and_the_agent_reads_on(agent_module: ModuleType, tmp_path: Path) -> None:
    port = tmp_path / "port"
    os.mkfifo(port)
    agent = agent_module.Agent(str(port))
    seen: list[tuple[int, int, bytes]] = []
    agent.on_frame = lambda cid, ftype, payload: seen.append((cid, ftype, payload))
    P = agent_module.P
    writer = os.open(port, os.O_WRONLY)
    try:
        os.write(writer, P.HEADER.pack(P.MAX_PAYLOAD + 1, 1, P.STDOUT) + b"rest of a frame out of step")
        agent.read_port()  # before: ValueError, the agent's exit
        assert seen == []
        os.write(writer, P.pack_json(7, P.RESULT, {"ok": True}))
        agent.read_port()
        assert [(cid, ftype) for cid, ftype, _ in seen] == [(7, P.RESULT)]
    finally:
        for fd in (writer, agent.port, agent.wake_r):
            os.close(fd)
