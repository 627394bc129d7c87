"""Many callers on one home at once: 4 processes through the library and one client over
REST remove the same 20 boxes, snapshot them and clone them from their snapshots.

The only errors allowed are the documented refusals (InvalidState, NotFound, and
AlreadyExists for the snapshot names that clash by design); no caller ever sees another
exception or an HTTP 500. Afterwards every surviving box and snapshot still has its
whole backing chain (garbage collection deleted nothing in use), and a sample of
survivors -- original boxes and clones made during the storm -- boot with their data.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import traceback

import pytest

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.disks import qcow2
from boxvm.disks.layers import TOP
from tests.helpers import pid_alive as _pid_alive

pytestmark = [pytest.mark.asyncio, pytest.mark.backends("remote")]  # rt: the REST client

BOXES = 20
PROCESSES = 4
OPS = 14  # per caller
ALLOWED = {"InvalidState", "NotFound", "BoxNotFound", "SnapshotNotFound", "AlreadyExists"}
BOOTS = 3  # ~5 s each under TCG


async def storm(rt: boxvm.Runtime, names: list[str], tag: str, seed: int) -> list[tuple[str, str, str]]:
    """Random operations on the shared boxes: (operation, box, outcome) for each."""
    rng = random.Random(seed)
    made: list[str] = []
    log = []
    for k in range(OPS):
        op = rng.choice(["remove", "snapshot", "snapshot", "clone", "clone", "snapshot-remove"])
        name = rng.choice(names if op == "remove" or not made else names + made)
        try:
            box = await rt.get(name)
            if box is None:
                raise boxvm.NotFound(f"{name} is gone")
            if op == "remove":
                await rt.remove(name)
            elif op == "snapshot":
                await box.snapshot.create(f"s-{rng.randrange(3)}")  # clashes between callers by design
            elif op == "clone":
                snaps = await box.snapshot.list()
                if not snaps:
                    raise boxvm.NotFound(f"{name} has no snapshot")
                clone = await box.clone(
                    f"{name[:40]}-{tag}{k}", boxvm.CloneOptions(from_snapshot=rng.choice(snaps).name)
                )
                made.append(clone.name)
            else:
                snaps = await box.snapshot.list()
                if not snaps or snaps[-1].name == "gold":
                    raise boxvm.NotFound(f"{name} has no snapshot of its own")
                await box.snapshot.remove(snaps[-1].name)
            log.append((op, name, "ok"))
        except boxvm.BoxvmError as exc:
            log.append((op, name, f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.append((op, name, f"UNEXPECTED {traceback.format_exc()}"))
    return log


def _process(home: str, names: list[str], tag: str, seed: int) -> list[tuple[str, str, str]]:
    async def run() -> list[tuple[str, str, str]]:
        async with boxvm.Runtime(home) as rt:
            return await storm(rt, names, tag, seed)

    return asyncio.run(run())


async def test_remove_snapshot_clone_storm(rt: boxvm.Runtime, local: LocalBackend) -> None:
    home = local.home
    src = await rt.create(name=f"storm-src-{os.urandom(2).hex()}")
    await src.start()
    assert (await src.exec(["sh", "-c", "echo seed > /root/data; sync"])).exit_code == 0
    await src.stop()
    await src.snapshot.create("gold")
    boxes = await src.clone_many(BOXES, boxvm.CloneOptions(from_snapshot="gold"))
    names = [b.name for b in boxes]
    for b in boxes:
        await b.snapshot.create("gold")
    ours = src.name  # every box of this test (clones included) has this prefix
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(PROCESSES) as pool:
            pending = pool.starmap_async(_process, [(str(home.root), names, f"p{i}-", i) for i in range(PROCESSES)])
            rest_log = await storm(rt, names, "r-", 99)
            logs = [*await asyncio.to_thread(pending.get, 300), rest_log]
        outcomes = [entry for log in logs for entry in log]
        bad = [e for e in outcomes if e[2] != "ok" and e[2].split(":")[0] not in ALLOWED]
        assert not bad, "\n".join(map(str, bad))
        done = {op for op, _n, o in outcomes if o == "ok"}
        assert {"remove", "snapshot", "clone"} <= done, outcomes  # the storm did real work

        survivors = [i for i in await rt.list() if i.name.startswith(ours) and i.name != ours]
        removed = {n for op, n, o in outcomes if op == "remove" and o == "ok"}
        assert survivors and not removed & {i.name for i in survivors}
        for info in survivors:  # nothing in use was collected: every chain is whole
            assert all(p.exists() for p in qcow2.chain(home.box_dir(info.id) / TOP)), info.name
            for snap in local.store.list_snapshots(info.id):
                assert all(p.exists() for p in qcow2.chain(local.layers.layer_path(snap.layer))), snap.name
            assert info.status in (boxvm.BoxStatus.STOPPED, boxvm.BoxStatus.CONFIGURED), info
        local.layers.recover_trash(local.store, _pid_alive)  # the exited workers' trash (start-up recovery's)
        stale = [e for e in os.listdir(home.tmp) if e.count("-") >= 2 and not _pid_alive(int(e.split("-")[-2]))]
        assert stale == [], "staging directories left behind"

        originals = [i for i in survivors if i.name in names]
        clones = [i for i in survivors if i.name not in names]
        sample = (originals[:1] + clones[:1] + originals[1:] + clones[1:])[:BOOTS]
        for info in sample:
            box = await rt.get(info.id)
            assert box is not None
            await box.start()
            assert (await box.exec(["cat", "/root/data"])).stdout == b"seed\n", info.name
            await box.stop()
    finally:
        for info in await rt.list():
            if info.name.startswith(ours):
                await rt.remove(info.id, force=True)
