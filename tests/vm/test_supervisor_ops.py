"""A box's control socket offers clients the supervisor's operations and an allow-list of
the agent's; the agent's internal steps (freeze, thaw, shutdown, ...) are refused."""

from __future__ import annotations

import asyncio

import pytest

import boxvm
from boxvm.engine.client import Connection
from boxvm.guest import protocol as P
from boxvm.paths import Home

pytestmark = pytest.mark.asyncio


async def test_a_client_cannot_send_the_agent_internal_operations(shared_box: boxvm.Box, home: Home) -> None:
    conn = await Connection.open(home.box_dir(shared_box.id) / "ctl.sock", shared_box.name)
    try:
        for op in [*sorted(P.AGENT_OPS - P.CLIENT_AGENT_OPS), "qmp", "settle", "op_stop", "__init__", None, ["freeze"]]:
            with pytest.raises(boxvm.InvalidArgument, match="no operation"):
                await conn.request(op)  # type: ignore[arg-type]
        # the guest was never frozen (a write goes through) and the box still runs
        write = shared_box.exec(["sh", "-c", "echo unfrozen > /root/not-frozen && cat /root/not-frozen"])
        assert (await asyncio.wait_for(write, 30)).stdout == b"unfrozen\n"
        assert (await shared_box.info()).status == boxvm.BoxStatus.RUNNING
        # the same connection still serves what clients may use
        assert type((await conn.request("clock"))["ns"]) is int
        assert (await conn.request("wait_ready", timeout=5))["ok"] is True
    finally:
        await conn.close()
