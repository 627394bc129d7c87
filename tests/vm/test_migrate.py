"""Migration of a stopped box to another ``boxvm serve`` runner (its own home, on loopback)
through the test S3 server, and its journal: the driving process SIGKILLed after each step
leaves exactly one owner (source, object in transit, or target) and running migrate again
finishes the move with identical content (``qemu-img compare`` judges)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import boxvm
from boxvm.disks.layers import TOP
from boxvm.migrate import migrate
from boxvm.paths import Home
from tests.helpers import serving
from tests.s3server import REST_PREFIX, S3Server

pytestmark = pytest.mark.asyncio
TOKEN = "migrate-" + os.urandom(8).hex()
VIA = f"{REST_PREFIX}migrate/"


@pytest.fixture(scope="module")
def target_home(home: Home, tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A second home, given the test home's guest bundle (hard links) so it can import."""
    other = Home.default(tmp_path_factory.mktemp("target-home"))
    other.ensure()
    shutil.rmtree(other.guest)
    shutil.copytree(home.guest, other.guest, copy_function=os.link)
    return other


@pytest.fixture(scope="module")
def target_url(target_home: Home, s3: S3Server) -> Iterator[str]:
    with serving(target_home, TOKEN) as (url, _pid):
        yield url


@pytest_asyncio.fixture
async def target(target_url: str) -> AsyncIterator[boxvm.Runtime]:
    async with boxvm.Runtime.remote(target_url, token=TOKEN) as rt:
        yield rt


async def a_box_with_data(rt: boxvm.Runtime, home: Home, name: str) -> boxvm.Box:
    """A stopped box whose disk holds 2 MiB a guest could have written, and a CoW clone of
    it (``<name>-ref``) kept as the reference for the content."""
    box = await rt.create(boxvm.BoxOptions(image="boxvm/slim"), name=name)
    top = str(home.box_dir(box.id) / TOP)
    for offset, pattern in ((0, 0x5A), (64 << 20, 0xA5)):
        run = subprocess.run(["qemu-io", "-c", f"write -P {pattern} {offset} 1M", top], capture_output=True)
        assert run.returncode == 0, run.stderr
    await box.clone(f"{name}-ref")
    return box


def same_content(home: Home, ref_id: str, target_home: Home, moved_id: str) -> None:
    a, b = home.box_dir(ref_id) / TOP, target_home.box_dir(moved_id) / TOP
    run = subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], capture_output=True)
    assert run.returncode == 0, run.stderr


def in_transit(s3: S3Server) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="rest/migrate/")
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.mark.parametrize("step", ["migrate:exported", "migrate:released", "migrate:imported"])
async def test_killed_after_each_step_leaves_one_owner_and_rerun_finishes(
    home: Home, target_home: Home, target: boxvm.Runtime, target_url: str, s3: S3Server, step: str
) -> None:
    """Kill the driving process after the step; then exactly one of the source, the object in
    transit or the target holds the box, and ``migrate`` again (the API call here; ``Box.migrate``
    or ``boxvm migrate`` in the killed child) finishes: the box gone from the source, the same disk on the target,
    no object left, no journal."""
    name = f"mig-{step.split(':')[1]}-{os.urandom(2).hex()}"
    async with boxvm.Runtime(home.root) as rt:
        await a_box_with_data(rt, home, name)
        ref = await rt.get(f"{name}-ref")
        assert ref is not None
    try:
        if step == "migrate:exported":  # the API in one child, the CLI in the others
            script = (
                "import asyncio, boxvm\n"
                "async def main():\n"
                "    async with boxvm.Runtime() as rt,"
                f" boxvm.Runtime.remote({target_url!r}, token={TOKEN!r}) as target:\n"
                f"        await (await rt.get({name!r})).migrate(target, via={VIA!r})\n"
                "asyncio.run(main())\n"
            )
            argv = [sys.executable, "-c", script]
        else:
            argv = [sys.executable, "-m", "boxvm.cli.main", "migrate", name, "--to", target_url, "--via", VIA]
        env = {**os.environ, "BOXVM_HOME": str(home.root), "BOXVM_FAULT": step, "BOXVM_TO_TOKEN": TOKEN}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        async with boxvm.Runtime(home.root) as rt:
            at_source = await rt.get(name) is not None
            at_target = await target.get(name) is not None
            owners = [at_source, at_target, not (at_source or at_target) and bool(in_transit(s3))]
            assert owners.count(True) == 1, (step, owners)
            moved = await migrate(rt.backend, name, target.backend, VIA)  # the same call again finishes
            assert await rt.get(name) is None
            same_content(home, ref.id, target_home, moved.id)
            assert in_transit(s3) == []
            assert not list((home.root / "migrations").glob(f"{name}*"))
            with pytest.raises(boxvm.InvalidArgument):  # --via must name a prefix
                await migrate(rt.backend, ref.id, target.backend, "s3://boxvm-test/no-slash")
    finally:
        async with boxvm.Runtime(home.root) as rt:
            await rt.remove(ref.id, force=True)
            if await rt.get(name) is not None:
                await rt.remove(name, force=True)
        if await target.get(name) is not None:
            await target.remove(name, force=True)


async def test_running_box_moves_with_its_processes(target: boxvm.Runtime, s3: S3Server) -> None:
    """A running box holding data and a counter process is suspended at the source, travels
    with its memory, and runs on the target with the same process still counting."""
    name = f"mig-run-{os.urandom(2).hex()}"
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"
    async with boxvm.Runtime() as rt:
        box = await rt.create(boxvm.BoxOptions(image="boxvm/slim", memory_mib=256), name=name)
        try:
            await box.start()
            setup = f"head -c 200000 /dev/urandom > /root/data; sync; ({counter}) >/dev/null 2>&1 & echo $!"
            r = await box.exec(["sh", "-c", setup])
            assert r.exit_code == 0, r.stderr
            pid = r.stdout.decode().strip()
            digest = (await box.exec(["md5sum", "/root/data"])).stdout
            await asyncio.sleep(0.5)
            before = int((await box.exec(["cat", "/tmp/count"])).stdout)
            moved = await box.migrate(target, via=VIA)
            assert (await moved.info()).status == boxvm.BoxStatus.RUNNING
            assert await rt.get(name) is None
            assert (await moved.exec(["md5sum", "/root/data"])).stdout == digest
            assert (await moved.exec(["sh", "-c", f"kill -0 {pid} && echo alive"])).stdout == b"alive\n"
            first = int((await moved.exec(["cat", "/tmp/count"])).stdout)
            await asyncio.sleep(0.6)
            assert before <= first < int((await moved.exec(["cat", "/tmp/count"])).stdout)
            assert in_transit(s3) == []
        finally:
            if await rt.get(name) is not None:
                await rt.remove(name, force=True)
            if await target.get(name) is not None:
                await target.remove(name, force=True)
