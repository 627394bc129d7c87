"""boxvm.ray on a real local Ray cluster: three nodes (``ray.cluster_utils.Cluster``), one runner
actor each with its own home, real slim-image VMs. Boxes spread by capacity, a Ray task on one node
execs in a box on another, a published snapshot is forked on two other nodes and retired, and a killed runner's
boxes fail clearly while the pool keeps serving from the rest (and a new runner finds them again)."""

from __future__ import annotations

import _thread
import asyncio
import collections
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from boxvm import BoxOptions
from boxvm.errors import AlreadyExists, EngineError, NotFound
from boxvm.paths import Home
from boxvm.ray import BoxPool, BoxRef, NoCapacity, RunnerUnavailable
from boxvm.ray.runner import seed_name
from tests.raycluster import ray_pool
from tests.s3server import S3Server

NODE_CPUS = 4  # logical cpus per Ray node: 6 boxes of 1 cpu spread 2/2/2, then 4 forks fill two nodes
NODE_MEMORY = 1 << 30
OPTS = BoxOptions(image="boxvm/slim", cpus=1, memory_mib=128, network="none")


@ray.remote
class Hung:
    """A runner that is alive but never answers (a stuck loop, say)."""

    async def retire(self, url: str) -> bool:
        await asyncio.sleep(3600)
        return False

    async def close(self, pool: str, remove_boxes: bool) -> bool:
        await asyncio.sleep(3600)
        return False


@dataclass
class Env:
    pool: BoxPool
    nodes: list[str]  # Ray node ids
    store: str  # where snapshots are published: s3://<the test bucket>/ray


@pytest.fixture(scope="module")
def env(home: Home, s3: S3Server, worker: str) -> Iterator[Env]:
    # The runners inherit the AWS endpoint and credentials tests.s3server put in this process's env.
    store = f"s3://{s3.bucket}/ray"
    with ray_pool(
        home, home.root / f"ray-nodes-{worker}", nodes=3, cpus=NODE_CPUS, memory=NODE_MEMORY, store=store
    ) as pool:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 3 and sorted(pool.start_runners()) == sorted(nodes)
        yield Env(pool, nodes, store)


@pytest.fixture(scope="module")
def boxes(env: Env) -> list[BoxRef]:
    return env.pool.create_many(6, OPTS, [f"ray-{i}" for i in range(6)])


def test_pool_on_three_nodes(env: Env, boxes: list[BoxRef], tmp_path: Path, s3: S3Server) -> None:
    """One test, three steps in order: each builds on the cluster state the one before left
    (as separate tests, xdist could run them on two workers with two clusters)."""
    boxes_spread_and_a_task_on_one_node_execs_on_another(env, boxes, tmp_path)
    snapshot_published_once_and_forked_on_two_other_nodes(env, boxes, s3)
    a_killed_runner_fails_its_boxes_clearly_and_the_pool_serves_on(env, boxes, s3)
    interrupted_creates_leave_nothing_and_pools_share_runners(env)


def boxes_spread_and_a_task_on_one_node_execs_on_another(env: Env, boxes: list[BoxRef], tmp_path: Path) -> None:
    assert collections.Counter(b.node_id for b in boxes) == {node: 2 for node in env.nodes}
    assert {load.node_id: load.used_cpus for load in env.pool.loads()} == {node: 2 for node in env.nodes}
    source = boxes[0]
    target = next(b for b in boxes if b.node_id != source.node_id)

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(source.node_id, soft=False))
    def probe(box: BoxRef) -> tuple[str, bytes]:
        result = box.exec(["sh", "-c", "echo from-task > /root/note; hostname"])
        assert result.exit_code == 0, result
        return ray.get_runtime_context().get_node_id(), result.stdout

    ran_on, hostname = ray.get(probe.remote(target))
    assert ran_on == source.node_id != target.node_id
    assert hostname.strip().decode() == target.info().name  # the box's own hostname is its name
    # Copies go through the handle from the caller's host to whatever node the box is on.
    target.copy_out("/root/note", tmp_path / "note")
    assert (tmp_path / "note").read_bytes() == b"from-task\n"
    (tmp_path / "in.txt").write_text("to-box")
    target.copy_in(tmp_path / "in.txt", "/root/in.txt")
    assert target.exec(["cat", "/root/in.txt"]).stdout == b"to-box"


def snapshot_published_once_and_forked_on_two_other_nodes(env: Env, boxes: list[BoxRef], s3: S3Server) -> None:
    source = boxes[0]
    assert source.exec(["sh", "-c", "echo snapshot-data > /root/data"]).exit_code == 0
    source.snapshot("base")
    assert source.exec(["sh", "-c", "echo later > /root/later"]).exit_code == 0  # not in the snapshot
    url = f"{env.store}/{uuid.uuid4().hex}.boxsnap"
    seed = env.pool.publish(source, url, snapshot="base")
    forks = env.pool.fork(seed, 4, names=[f"fork-{i}" for i in range(4)], exclude=[source.node_id])
    others = set(env.nodes) - {source.node_id}
    assert collections.Counter(f.node_id for f in forks) == {node: 2 for node in others}
    for fork in forks:
        result = fork.exec(["sh", "-c", "cat /root/data; test -e /root/later && echo leaked; hostname"])
        assert result.stdout.decode().split() == ["snapshot-data", fork.name]
    assert s3.client().head_object(Bucket=s3.bucket, Key=url.split("/", 3)[3])["ContentLength"] > 0
    again = env.pool.fork(seed, 1, start=False, exclude=[source.node_id])  # reuses that node's import
    for node in env.nodes:  # imported once per node that forks, and there only
        runner = env.pool._runners[node]
        assert ray.get(runner.seeds.remote()) == ([seed_name(url)] if node in others else [])
    again[0].remove()
    assert all(f.info().chain_depth == 2 for f in forks)  # its own top on the imported layer: copy-on-write
    # Retired: every node's copy goes, then the object; the forks keep their disks, new forks fail.
    assert sorted(env.pool.retire(seed)) == sorted(others)
    assert all(ray.get(env.pool._runners[node].seeds.remote()) == [] for node in env.nodes)
    assert s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=url.split("/", 3)[3])["KeyCount"] == 0
    assert forks[0].exec(["cat", "/root/data"]).stdout == b"snapshot-data\n"
    with pytest.raises(NotFound):
        env.pool.fork(seed, 1, start=False)


def a_killed_runner_fails_its_boxes_clearly_and_the_pool_serves_on(env: Env, boxes: list[BoxRef], s3: S3Server) -> None:
    victim = next(b.node_id for b in boxes if b.node_id != boxes[0].node_id)  # it holds two forks too
    ray.kill(env.pool._runners[victim], no_restart=True)
    for box in [b for b in boxes if b.node_id == victim]:
        with pytest.raises(RunnerUnavailable) as caught:
            box.exec(["true"])
        assert isinstance(caught.value, EngineError)
        assert victim[:12] in caught.value.message and box.name in caught.value.message
    survivors = {load.node_id for load in env.pool.loads()}
    assert survivors == set(env.nodes) - {victim} and victim in env.pool.lost
    fresh = env.pool.create(OPTS, "after-kill")
    assert fresh.node_id in survivors
    assert fresh.exec(["echo", "ok"]).stdout == b"ok\n"
    # A clone of a box on a full node goes, through the pool's store, to the one with room.
    full = next(b for b in boxes if b.node_id in survivors - {fresh.node_id})
    assert full.exec(["sh", "-c", "echo cloned > /root/c"]).exit_code == 0
    (moved,) = env.pool.clone(full)
    assert moved.node_id == fresh.node_id != full.node_id
    assert moved.exec(["cat", "/root/c"]).stdout == b"cloned\n"
    # ... and what it published for that goes: the object and every node's import of it.
    assert s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="ray/")["KeyCount"] == 0
    assert all(ray.get(env.pool._runners[node].seeds.remote()) == [] for node in survivors)
    with pytest.raises(AlreadyExists):  # a name is the pool's, not a node's
        env.pool.create(OPTS, "after-kill")
    for box in boxes:
        if box.node_id != victim:
            assert box.exec(["true"]).exit_code == 0
    # The VMs outlived their runner: a new one over the same home serves them to new handles.
    orphan = next(b for b in boxes if b.node_id == victim)
    assert victim in env.pool.start_runners() and victim not in env.pool.lost
    back = env.pool.get(orphan.name)
    assert back is not None and back.node_id == victim and back.runner != orphan.runner
    assert back.exec(["cat", "/proc/uptime"]).exit_code == 0
    with pytest.raises(RunnerUnavailable):
        orphan.info()  # an old handle holds the dead actor


def interrupted_creates_leave_nothing_and_pools_share_runners(env: Env) -> None:
    for box in env.pool.boxes():  # room on the two nodes that hold forks
        if box.name.startswith("fork-"):
            box.remove(force=True)
    # Ctrl-C while the runners boot the boxes: every box asked for goes, once made.
    names = ["cut-0", "cut-1"]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a worker may ignore SIGINT
    timer = threading.Timer(2.0, _thread.interrupt_main)
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            env.pool.create_many(2, OPTS, names)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert [b.name for b in env.pool.boxes() if b.name in names] == []
    # A runner killed while it boots a box: the box (its VM outlives the runner) goes once a
    # runner serves the node again.
    node = next(load.node_id for load in env.pool.loads() if load.free_cpus >= 1)
    threading.Timer(1.5, ray.kill, (env.pool._runners[node],), {"no_restart": True}).start()
    with pytest.raises((NoCapacity, RunnerUnavailable)):  # its share had nowhere else to go
        env.pool.create_many(1, OPTS, ["orphan"], exclude=set(env.nodes) - {node})
    assert node in env.pool.lost
    assert node in env.pool.start_runners()  # the new runner removes what the dead one's call made
    assert env.pool.get("orphan") is None
    # A second pool shares the nodes' runners; its shutdown leaves them serving the first.
    before = sorted(b.name for b in env.pool.boxes())
    other = BoxPool(env.pool._home, store=env.store)
    assert sorted(other._runners) == sorted(env.pool._runners) and sorted(b.name for b in other.boxes()) == before
    # A runner that hangs (alive, never answering) bounds neither a retire nor a shutdown:
    # each raises after its timeout, and the hung runner stays in the pool.
    hung = Hung.options(num_cpus=0).remote()
    other._runners["hung-node"] = hung
    t0 = time.monotonic()
    with pytest.raises(RunnerUnavailable, match="no answer within 2 s"):
        other.retire(f"{env.store}/never-published.boxsnap", delete_object=False, timeout=2)
    with pytest.raises(RunnerUnavailable, match="no answer within 2 s"):
        other.shutdown(timeout=2)
    assert list(other._runners) == ["hung-node"] and time.monotonic() - t0 < 30
    ray.kill(hung, no_restart=True)
    assert sorted(b.name for b in env.pool.boxes()) == before and len(before) >= 6 and not env.pool.lost
    assert all(box.exec(["true"]).exit_code == 0 for box in env.pool.boxes())
