"""Migration to another ``boxvm serve`` runner (its own home, on loopback), directly (the
source's export streamed into the target's import) and through the test S3 server, under
SIGKILL at each step on either side: the driving process after each journal step, the
source runner while it suspends, exports, uploads and removes, the target runner while it
imports, right after it committed the import, in the instant between marking the box
``starting`` and spawning its supervisor, and while that supervisor resumes it. After every
kill one holder owns the box (the source, the object in transit, or the target: the one
holding the journal's box id once it committed); the killed runner is restarted on its home
and running migrate again finishes the move with the box's data intact (``qemu-img
compare`` judges a stopped box's disk; a running box keeps its files and its counting
process)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import boxvm
from boxvm.backends.base import Backend
from boxvm.disks.layers import TOP
from boxvm.errors import BoxvmError
from boxvm.migrate import migrate
from boxvm.paths import Home
from tests.s3server import REST_PREFIX, S3Server

pytestmark = pytest.mark.asyncio
TOKEN = "migrate-" + os.urandom(8).hex()
VIA = f"{REST_PREFIX}migrate/"


@dataclass
class Runner:
    """A ``boxvm serve`` over ``home`` that can die at a fault point and be restarted on the
    same port (the journal names the target by its URL)."""

    home: Home
    port: int = 0
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, fault: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "BOXVM_FAULT"} | {"BOXVM_HOME": str(self.home.root)}
        if fault is not None:
            env["BOXVM_FAULT"] = fault
        argv = [sys.executable, "-m", "boxvm.cli.main", "--token", TOKEN, "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "serving" in line, line
        self.port = int(line.split()[-1].removesuffix("/v1").rsplit(":", 1)[1])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def was_killed(self, after: object = None) -> None:
        """It died of SIGKILL (at its fault point); ``after``: what the attempt returned, for
        the failure message when it did not."""
        assert self.proc is not None
        try:
            code = self.proc.wait(180)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the runner never reached its fault point; the attempt returned {after!r}") from None
        assert code == -signal.SIGKILL, (code, after)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def target_home(home: Home, tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A second home, given the test home's guest bundle (hard links) so it can import."""
    other = Home.default(tmp_path_factory.mktemp("target-home"))
    other.ensure()
    shutil.rmtree(other.guest)
    shutil.copytree(home.guest, other.guest, copy_function=os.link)
    return other


@pytest.fixture(scope="module")
def runners(home: Home, target_home: Home, s3: S3Server) -> Iterator[tuple[Runner, Runner]]:
    """The source runner (over the test home) and the target runner (its own home)."""
    pair = Runner(home), Runner(target_home)
    try:
        for runner in pair:
            runner.start()
        yield pair
    finally:
        for runner in pair:
            runner.stop()


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


def uploads(s3: S3Server) -> list[str]:
    """Multipart uploads begun under the migration prefix and neither completed nor aborted."""
    listing = s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix="rest/migrate/")
    return [u["Key"] for u in listing.get("Uploads", [])]


async def holders(source: Backend, target: Backend, s3: S3Server, name: str) -> list[str]:
    """Who holds the box: the runners that list it, else the object in transit."""
    found = [side for side, b in (("source", source), ("target", target)) if await b.get(name) is not None]
    return found or (["object"] if in_transit(s3) else [])


def finished(home: Home, s3: S3Server, name: str) -> None:
    """Nothing of the move is left: no object, no multipart upload, no journal or lock."""
    assert in_transit(s3) == [] and uploads(s3) == []
    assert not list((home.root / "migrations").glob(f"{name}*"))


def killed_driver(home: Home, target: Runner, box: str, via: str | None, step: str, by_cli: bool) -> None:
    """Drive the move of ``box`` from the test home to ``target`` in a process of its own,
    through ``boxvm migrate`` or the API, and see it SIGKILLed at the fault point ``step``."""
    api = (
        "import asyncio, boxvm\n"
        "async def main():\n"
        "    async with boxvm.Runtime() as rt,"
        f" boxvm.Runtime.remote({target.url!r}, token={TOKEN!r}) as target:\n"
        f"        await (await rt.get({box!r})).migrate(target, via={via!r})\n"
        "asyncio.run(main())\n"
    )
    cli = [sys.executable, "-m", "boxvm.cli.main", "migrate", box, "--to", target.url] + (["--via", via] if via else [])
    env = {**os.environ, "BOXVM_HOME": str(home.root), "BOXVM_FAULT": step, "BOXVM_TO_TOKEN": TOKEN}
    proc = subprocess.run(
        cli if by_cli else [sys.executable, "-c", api], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# Each way's driver kills (a stopped box, the driver on the source host): the fault point,
# who holds the box after it, whether the CLI (else the API) drives. Directly, a driver
# killed right after the target's commit leaves both listing it: the target's copy (the
# journal's id) is the box; the re-run removes the source's.
DRIVER_STEPS = {
    "bucket": [
        ("s3:part-uploaded", ["source"], True),  # killed mid-upload: the next export aborts its upload
        ("migrate:exported", ["source"], False),
        ("migrate:released", ["object"], True),
        ("migrate:imported", ["target"], True),
    ],
    "direct": [
        ("export:disk-streamed", ["source"], False),  # killed mid-stream: the target drops the upload
        ("migrate:imported", ["source", "target"], True),
        ("migrate:released", ["target"], True),
    ],
}


@pytest.mark.parametrize("way", ["bucket", "direct"])
async def test_driver_killed_after_each_step(
    home: Home, target_home: Home, runners: tuple[Runner, Runner], s3: S3Server, way: str
) -> None:
    """The process driving the move of a stopped box (on the source host: its home is the
    source) is SIGKILLed at each step in turn, through the API and ``boxvm migrate``; after
    each kill the box is where it should be, and the same call again finishes the move: gone
    from the source, the same disk and the same id on the target. Through the bucket, the
    target runner is also killed while it imports the object (verified, not committed: the
    object still holds the box). Directly, a box of the same name made on the target while
    the move is under way is not taken for the moved one."""
    target = runners[1]
    name = f"mig-drv-{os.urandom(2).hex()}"
    via = VIA if way == "bucket" else None
    async with boxvm.Runtime(home.root) as rt, boxvm.Runtime.remote(target.url, token=TOKEN) as tgt:
        box = await a_box_with_data(rt, home, name)
        ref = await rt.get(f"{name}-ref")
        assert ref is not None
        try:
            for step, holder, by_cli in DRIVER_STEPS[way]:
                killed_driver(home, target, name, via, step, by_cli)
                assert await holders(rt.backend, tgt.backend, s3, name) == holder, step
                if step == "export:disk-streamed":  # someone else's box under the name: refused, not adopted
                    impostor = await tgt.create(boxvm.BoxOptions(image="boxvm/slim"), name=name)
                    with pytest.raises(boxvm.AlreadyExists):
                        await migrate(rt.backend, name, tgt.backend, via)
                    assert (await rt.get(name)) is not None
                    await tgt.remove(impostor.id)
                if holder == ["object"]:  # only the object holds it: the target dies importing it
                    target.stop()
                    target.start("import:renamed")
                    with pytest.raises(BoxvmError):
                        await migrate(rt.backend, name, tgt.backend, via)
                    target.was_killed()
                    target.start()
                    assert await holders(rt.backend, tgt.backend, s3, name) == ["object"]
            moved = await migrate(rt.backend, name, tgt.backend, via)
            assert await rt.get(name) is None and moved.id == box.id
            same_content(home, ref.id, target_home, moved.id)
            finished(home, s3, name)
            with pytest.raises(boxvm.InvalidArgument):  # --via must name a prefix
                await migrate(rt.backend, ref.id, tgt.backend, "s3://boxvm-test/no-slash")
        finally:
            await rt.remove(ref.id, force=True)
            for runtime in (rt, tgt):
                if await runtime.get(name) is not None:
                    await runtime.remove(name, force=True)


async def test_a_rerun_moves_the_box_as_it_is_now_and_knows_it_by_id(
    home: Home, target_home: Home, runners: tuple[Runner, Runner], s3: S3Server
) -> None:
    """Through the bucket, the driver dies right after its export completed, before it
    recorded that (the box is still the source's), and the box runs at the source and
    writes a file: the re-run moves the box as it is now, not the older archive. That run
    dies once the source's copy is gone; a run naming the box by its id, which the source
    no longer knows, finishes the move, and both objects are deleted."""
    target = runners[1]
    name = f"mig-again-{os.urandom(2).hex()}"

    async def write(box: boxvm.Box, path: str) -> None:
        await box.start()
        r = await box.exec(["sh", "-c", f"head -c 300000 /dev/urandom > {path} && sync"])
        assert r.exit_code == 0, r.stderr
        await box.stop()

    async with boxvm.Runtime(home.root) as rt, boxvm.Runtime.remote(target.url, token=TOKEN) as tgt:
        box = await rt.create(boxvm.BoxOptions(image="boxvm/slim"), name=name)
        try:
            await write(box, "/root/before")
            killed_driver(home, target, name, VIA, "migrate:exported", False)
            assert await holders(rt.backend, tgt.backend, s3, name) == ["source"] and len(in_transit(s3)) == 1
            await write(box, "/root/after")
            now = await box.clone(f"{name}-now")
            killed_driver(home, target, name, VIA, "migrate:released", True)
            assert await holders(rt.backend, tgt.backend, s3, name) == ["object"]
            moved = await migrate(rt.backend, box.id, tgt.backend, VIA)
            assert moved.id == box.id and moved.name == name
            same_content(home, now.id, target_home, moved.id)
            finished(home, s3, name)
        finally:
            for runtime in (rt, tgt):
                for left in (name, f"{name}-now"):
                    if await runtime.get(left) is not None:
                        await runtime.remove(left, force=True)


async def test_a_driver_without_s3_credentials_still_finishes_a_bucket_move(
    home: Home, runners: tuple[Runner, Runner], s3: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """The runners move the bytes with their own S3 settings; the process driving the move
    has no credentials (another host, say): the move still ends, the box on the target and
    the journal gone, and a warning names the object it could not delete."""
    source, target = runners
    name = f"mig-nokey-{os.urandom(2).hex()}"
    client = s3.client()  # the tests' own credentials, taken before the driver loses them
    async with boxvm.Runtime(home.root) as rt:
        await rt.create(boxvm.BoxOptions(image="boxvm/slim"), name=name)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with (
        boxvm.Runtime.remote(source.url, token=TOKEN) as src,
        boxvm.Runtime.remote(target.url, token=TOKEN) as tgt,
    ):
        try:
            with caplog.at_level(logging.WARNING, logger="boxvm"):
                moved = await migrate(src.backend, name, tgt.backend, VIA)
            assert moved.name == name and await src.get(name) is None
            [left] = in_transit(s3)
            assert left in caplog.text and "could not be deleted" in caplog.text
            assert not list((home.root / "migrations").glob(f"{name}*"))
        finally:
            for key in in_transit(s3):
                client.delete_object(Bucket=s3.bucket, Key=key)
            for runtime in (src, tgt):
                if await runtime.get(name) is not None:
                    await runtime.remove(name, force=True)


async def test_running_box_moves_while_runners_are_killed(
    home: Home, target_home: Home, runners: tuple[Runner, Runner], s3: S3Server
) -> None:
    """A running box holding data and a counter process moves directly between two runners
    while each is SIGKILLed at its steps: the source while it suspends the box, while it
    streams the archive (the disk sent) and while it removes the box; the target while it
    imports (verified, renamed into place, not committed), right after it committed the
    import (before it answered), between marking the box ``starting`` and spawning its
    supervisor, and while that supervisor resumes it. Each killed runner is restarted on its
    home, the box is where it should be after each kill (a start killed before its supervisor
    ran is undone at once: the box is ``suspended`` again, not ``starting`` and then
    ``failed``), and migrate run again ends with the box running on the target with the same
    id, its file intact and the same process still counting (resumed, not booted cold). It
    then moves back through the bucket, still running, and counts on in the source runner."""
    source, target = runners
    name = f"mig-run-{os.urandom(2).hex()}"
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"

    async def attempt(kill: tuple[Runner, Callable[[boxvm.BoxInfo], bool]] | None = None) -> Any:
        """Run migrate directly through both runners; ``kill``: SIGKILL that runner once its box passes the test."""
        async with (
            boxvm.Runtime.remote(source.url, token=TOKEN) as src,
            boxvm.Runtime.remote(target.url, token=TOKEN) as tgt,
        ):
            move = asyncio.create_task(migrate(src.backend, name, tgt.backend))
            if kill is not None:
                runner, when = kill
                watch = src if runner is source else tgt
                while not move.done():
                    info = await watch.get(name)
                    if info is not None and when(info):
                        runner.kill()
                        break
                    await asyncio.sleep(0.05)
            try:
                return await move
            except BoxvmError as exc:
                return exc

    async def check(expected: list[str]) -> None:
        async with (
            boxvm.Runtime.remote(source.url, token=TOKEN) as src,
            boxvm.Runtime.remote(target.url, token=TOKEN) as tgt,
        ):
            assert await holders(src.backend, tgt.backend, s3, name) == expected

    def killed_then(runner: Runner, fault: str | None = None, after: object = None) -> None:
        runner.was_killed(after)
        runner.start(fault)

    async def suspended_at(runner: Runner) -> None:
        """The suspend a killed runner asked for is finished by the box's supervisor, which
        outlives the runner: until then the box is ``suspending`` and a migrate is refused
        ("wait for its operation to end")."""
        async with boxvm.Runtime.remote(runner.url, token=TOKEN) as rt:
            for _ in range(600):
                info = await rt.get(name)
                if info is not None and info.status != boxvm.BoxStatus.SUSPENDING:
                    break
                await asyncio.sleep(0.1)
            assert info is not None and info.status == boxvm.BoxStatus.SUSPENDED, info

    async def counting(runner: Runner, pid: str, digest: bytes, before: int) -> None:
        """The box runs there with its file and the same process, still counting."""
        async with boxvm.Runtime.remote(runner.url, token=TOKEN) as rt:
            there = await rt.get(name)
            assert there is not None and there.status == boxvm.BoxStatus.RUNNING
            assert (await there.exec(["md5sum", "/root/data"])).stdout == digest
            assert (await there.exec(["sh", "-c", f"kill -0 {pid} && echo alive"])).stdout == b"alive\n"
            first = int((await there.exec(["cat", "/tmp/count"])).stdout)
            await asyncio.sleep(0.6)
            assert before <= first < int((await there.exec(["cat", "/tmp/count"])).stdout)

    async with boxvm.Runtime(home.root) as rt:
        box = await rt.create(boxvm.BoxOptions(image="boxvm/slim"), name=name)  # warm: resumes the slim template
        try:
            await box.start()
            setup = f"head -c 200000 /dev/urandom > /root/data; sync; ({counter}) >/dev/null 2>&1 & echo $!"
            r = await box.exec(["sh", "-c", setup])
            assert r.exit_code == 0, r.stderr
            pid = r.stdout.decode().strip()
            digest = (await box.exec(["md5sum", "/root/data"])).stdout
            await asyncio.sleep(0.5)
            before = int((await box.exec(["cat", "/tmp/count"])).stdout)

            suspending = (source, lambda info: info.status == boxvm.BoxStatus.SUSPENDING)
            assert isinstance(await attempt(suspending), BoxvmError)
            source.start("export:disk-streamed")
            await check(["source"])
            await suspended_at(source)
            mid_stream = await attempt()
            assert isinstance(mid_stream, BoxvmError)  # the source dies mid-stream
            killed_then(source, "remove:row-deleted", mid_stream)
            await check(["source"])
            target.stop()
            target.start("import:renamed")
            assert isinstance(await attempt(), BoxvmError)
            killed_then(target, "import:committed")
            await check(["source"])
            assert isinstance(await attempt(), BoxvmError)  # committed, not answered
            killed_then(target, "start:marked")
            await check(["source", "target"])  # the target's is the box: it has the journal's id
            assert isinstance(await attempt(), BoxvmError)  # the source dies removing its copy
            killed_then(source)
            await check(["target"])
            assert isinstance(await attempt(), BoxvmError)  # the target dies with the box marked starting
            killed_then(target)
            async with boxvm.Runtime.remote(target.url, token=TOKEN) as tgt:
                undone = await tgt.get(name)  # at once, with its memory state: not starting, then failed
                assert undone is not None and undone.status == boxvm.BoxStatus.SUSPENDED, undone
            # once its supervisor runs (it made its control socket): it resumes the box on its own
            resuming = (
                target,
                lambda i: i.status == boxvm.BoxStatus.STARTING and (target_home.box_dir(i.id) / "ctl.sock").exists(),
            )
            assert isinstance(await attempt(resuming), BoxvmError)
            target.start()
            await check(["target"])

            moved = await attempt()
            assert isinstance(moved, boxvm.BoxInfo), moved
            assert moved.status == boxvm.BoxStatus.RUNNING and moved.id == box.id
            await counting(target, pid, digest, before)
            finished(home, s3, name)

            async with (  # and back through the bucket, running: suspended, an object, resumed there
                boxvm.Runtime.remote(source.url, token=TOKEN) as src,
                boxvm.Runtime.remote(target.url, token=TOKEN) as tgt,
            ):
                back = await migrate(tgt.backend, name, src.backend, VIA)
                assert back.status == boxvm.BoxStatus.RUNNING and back.id == box.id
                assert await holders(src.backend, tgt.backend, s3, name) == ["source"]
            await counting(source, pid, digest, before)
            finished(home, s3, name)
        finally:
            for runner in runners:  # as the fixture gave them: running
                if runner.proc is None or runner.proc.poll() is not None:
                    runner.start()
            if await rt.get(name) is not None:
                await rt.remove(name, force=True)
            async with boxvm.Runtime.remote(target.url, token=TOKEN) as tgt:
                if await tgt.get(name) is not None:
                    await tgt.remove(name, force=True)


async def test_a_box_is_moved_by_one_driver_at_a_time(
    home: Home, runners: tuple[Runner, Runner], s3: S3Server, tmp_path: Path
) -> None:
    """Drivers in different homes are not kept apart by either's lock: the source holds the
    box for one move (a lease, by the move's nonce). A driver elsewhere holds it here (over
    REST): this one is refused before anything moves, and leaves no journal. The holder's
    own move takes it again; a clone of the box is not held. ``boxvm migrate --release``
    refuses to let go of a move begun elsewhere unless ``--force``d; then the move goes
    through. No migration mark reaches an archive."""
    source, target = runners
    name = f"mig-lease-{os.urandom(2).hex()}"
    elsewhere = secrets.token_hex(32)  # what a move driven from another home holds it by
    async with (
        boxvm.Runtime.remote(source.url, token=TOKEN) as src,
        boxvm.Runtime.remote(target.url, token=TOKEN) as tgt,
    ):
        box = await src.create(boxvm.BoxOptions(image="boxvm/slim"), name=name)
        try:
            await src.backend.lease(box.id, elsewhere)
            with pytest.raises(boxvm.InvalidState, match="being moved by another migration"):
                await migrate(src.backend, name, tgt.backend, None)
            assert await src.get(name) is not None and await tgt.get(name) is None
            assert not list((home.root / "migrations").glob(f"{name}*.json"))
            await src.backend.lease(box.id, elsewhere)  # the holder's own move, run again
            with pytest.raises(boxvm.InvalidArgument):  # a holder is 64 hex digits
                await src.backend.lease(box.id, "x" * 10_000)
            clone = await box.clone(f"{name}-clone")  # a clone of a held box is not held
            held = secrets.token_hex(32)
            await src.backend.lease(clone.id, held)
            await src.backend.remove(clone.id, False, held)
            # Held, it is exported and removed only by that move: a driver that takes no
            # lease (an older boxvm) is kept apart too.
            with pytest.raises(boxvm.InvalidState, match="a migration is moving it"):
                await box.export(tmp_path / "held.boxsnap")
            with pytest.raises(boxvm.InvalidState, match="a migration is moving it"):
                await src.remove(name, force=True)
            assert not (tmp_path / "held.boxsnap").exists()
            cli = [sys.executable, "-m", "boxvm.cli.main", "migrate", name, "--to", target.url, "--release"]
            env = {**os.environ, "BOXVM_HOME": str(home.root), "BOXVM_TO_TOKEN": TOKEN}
            run = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode != 0 and "driven from elsewhere" in run.stderr, run.stderr  # not this home's move
            run = subprocess.run([*cli, "--force"], env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            exported = await box.export(tmp_path / "released.boxsnap", boxvm.ExportOptions(compress=False))
            with tarfile.open(exported) as tar:
                member = tar.extractfile("manifest.json")
                assert member is not None
                manifest = json.loads(member.read())
            assert not {"lease", "migration"} & set(manifest["box_options"])
            moved = await migrate(src.backend, name, tgt.backend, None)
            assert moved.id == box.id and await src.get(name) is None
            finished(home, s3, name)
        finally:
            for runtime in (src, tgt):
                if await runtime.get(name) is not None:
                    await runtime.backend.release_lease(name, None)
                    await runtime.remove(name, force=True)
