"""``boxvm.ray``'s runner without a Ray cluster: the calls a pool gives up on. A pool that is
interrupted, or whose other node failed, asks the runner to ``discard`` a call by its token;
a runner that died in a call leaves a journal its node's next runner acts on. Boxes are
created, not started (no VM is needed to make or remove them)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import boxvm
from boxvm.errors import InvalidState
from boxvm.paths import Home
from boxvm.ray.runner import Runner, seed_name

pytestmark = [pytest.mark.asyncio]
OPTS = boxvm.BoxOptions(image="boxvm/slim")


async def names(home: Home, prefix: str) -> list[str]:
    async with boxvm.Runtime(home.root) as rt:
        return sorted(b.name for b in await rt.list() if b.name.startswith(prefix))


async def test_a_discarded_call_removes_what_it_made_and_no_other_box(home: Home) -> None:
    prefix = f"discard-{os.urandom(2).hex()}"
    runner = Runner(str(home.root), "test-node", 64, 1 << 16)
    try:
        await runner.create(OPTS, [f"{prefix}-a1", f"{prefix}-a2"], False, "call-a")
        await runner.create(OPTS, [f"{prefix}-b"], False, "call-b")
        with pytest.raises(boxvm.AlreadyExists):  # a name on the node is no call's to make (nor to undo)
            await runner.create(OPTS, [f"{prefix}-b", f"{prefix}-d"], False, "call-d")
        assert len(await runner.discard("call-a")) == 2  # exactly the boxes of that call
        assert await names(home, prefix) == [f"{prefix}-b"]
        # A discard that comes before its call (Ray does not order an async actor's calls):
        # the call then refuses to make anything.
        assert await runner.discard("call-c") == []
        with pytest.raises(InvalidState, match="gave up on this call"):
            await runner.create(OPTS, [f"{prefix}-c"], False, "call-c")
        assert await names(home, prefix) == [f"{prefix}-b"]
    finally:
        await runner.discard("call-b")
        await runner.close("test", False)
    assert await names(home, prefix) == []


async def test_the_next_runner_undoes_the_calls_a_dead_runner_was_making(home: Home) -> None:
    """A journal a killed runner left (unlocked: its process is gone) names the boxes its
    call was making: the node's next runner removes them before it serves any pool, and no
    box it does not name. A journal still locked (a live runner's) is left alone."""
    prefix = f"dead-{os.urandom(2).hex()}"
    first = Runner(str(home.root), "test-node", 64, 1 << 16)
    await first.create(OPTS, [f"{prefix}-made", f"{prefix}-kept"], False, "call-1")
    await first.close("test", False)
    journals = home.tmp / "raycalls"
    (journals / "dead-call").write_text(json.dumps([f"{prefix}-made", f"{prefix}-never-made"]))
    (journals / ".half-written.new").write_text("[")  # its writer died before it named it
    second = Runner(str(home.root), "test-node", 64, 1 << 16)
    try:
        async with second._call("live-call", [f"{prefix}-live"]):  # this process holds its lock
            third = Runner(str(home.root), "test-node", 64, 1 << 16)
            await third.attach("pool")
            await third.close("pool", False)
        assert await names(home, prefix) == [f"{prefix}-kept"]
        assert not (journals / "dead-call").exists() and not (journals / ".half-written.new").exists()
        assert not (journals / "live-call").exists()  # ended with its block
    finally:
        async with boxvm.Runtime(home.root) as rt:
            for name in await names(home, prefix):
                await rt.remove(name, force=True)
        await second.close("test", False)


async def test_runners_over_one_home_import_a_seed_once_and_a_retire_waits_for_its_forks(
    home: Home, tmp_path: Path
) -> None:
    """Two runners over one home (pools in two Ray namespaces) fork one archive at once: one
    imports the seed, both clone it (before, each imported it under the same name: one failed,
    or removed the other's import halfway). A retire waits while a fork holds the seed."""
    prefix = f"seeded-{os.urandom(2).hex()}"
    archive = tmp_path / "seed.boxsnap"
    async with boxvm.Runtime(home.root) as rt:
        box = await rt.create(OPTS, f"{prefix}-source")
        await box.export(str(archive))
        await rt.remove(box.id, force=True)
    first, second = (Runner(str(home.root), "test-node", 64, 1 << 16) for _ in range(2))
    try:
        made = await asyncio.gather(
            first.fork(str(archive), [f"{prefix}-a"], False, "seed-call-a"),
            second.fork(str(archive), [f"{prefix}-b"], False, "seed-call-b"),
        )
        assert sorted(i.name for infos in made for i in infos) == [f"{prefix}-a", f"{prefix}-b"]
        seed = seed_name(str(archive))
        assert seed in await first.seeds()
        async with first._seeded(str(archive)):  # a fork's clone under way
            retire = asyncio.create_task(second.retire(str(archive)))
            await asyncio.sleep(0.5)
            assert not retire.done()
        assert await asyncio.wait_for(retire, 30)
        assert seed not in await first.seeds()
    finally:
        async with boxvm.Runtime(home.root) as rt:
            for name in await names(home, prefix):
                await rt.remove(name, force=True)
        await first.close("test", False)
        await second.close("test", False)
