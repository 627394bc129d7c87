"""``processes.alive`` decides recovery and waits for supervisors: a zombie is gone."""

from __future__ import annotations

import os

from boxvm.processes import alive


def test_a_zombie_is_not_alive_and_a_live_process_is() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            pass  # until the child has exited, without reaping it
        assert not alive(pid)
    finally:
        os.waitpid(pid, 0)
    assert not alive(pid)
    assert alive(os.getpid())
    assert alive(1)  # another user's or not, init exists
