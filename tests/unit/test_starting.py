"""The starting window (``boxvm/state/starting.py``): a start whose process died before its
supervisor ran is undone to the status it began from, and recovery's rollback and the
supervisor's registration exclude each other (one compare-and-set on the start's token)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import types
from pathlib import Path

import pytest

from boxvm.backends import local as local_mod
from boxvm.backends.local import LocalBackend
from boxvm.disks.layers import TOP, LayerStore
from boxvm.engine.supervisor import Supervisor
from boxvm.images import ImageStore
from boxvm.paths import Home
from boxvm.progress import silent
from boxvm.state import starting
from boxvm.state.boxes import Boxes, pid_is
from boxvm.state.context import Context
from boxvm.status import BoxStatus
from boxvm.store import BoxRecord, Store


def _boxes(root: Path) -> Boxes:
    home = Home.default(root)
    home.ensure()
    store = Store(home.db)
    return Boxes(Context(home, store, ImageStore(home, store), LayerStore(home), silent))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fake_supervisor(box_id: str) -> subprocess.Popen[bytes]:
    """A process that passes for the box's supervisor (the box's id in its argv; the shell
    stays), once it does."""
    proc = subprocess.Popen(["sh", "-c", "sleep 30; exit 0", box_id])
    deadline = time.monotonic() + 5
    while not pid_is(proc.pid, box_id) and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def _marked(
    boxes: Boxes, owner: int, age: float = 0.0, recorded: bool = True, since: int | None = None
) -> tuple[str, float]:
    """A suspended box marked ``starting`` by a start of ``owner`` (``age`` seconds ago; its
    process started at ``since``, else as ``owner`` did) whose supervisor never registered:
    what a runner killed at ``start:marked`` leaves."""
    box_id = os.urandom(16).hex()
    rec = BoxRecord(id=box_id, name=f"b-{box_id[:6]}", status=BoxStatus.SUSPENDED, image="x", options={}, mac="m")
    rec.started_at = 1000.0
    boxes.store.insert_box(rec)
    boxes.home.box_dir(box_id).mkdir(parents=True)
    token = time.time() - age
    if recorded:
        since = since if since is not None else starting.process_start(owner)
        start = starting.Start(token, BoxStatus.SUSPENDED, 1000.0, owner, since)
        starting.record(boxes.home.box_dir(box_id), start)
    assert boxes.store.transition(box_id, BoxStatus.STARTING, {BoxStatus.SUSPENDED}, started_at=token)
    return box_id, token


def test_a_start_whose_process_died_is_undone_at_once_and_its_late_supervisor_is_refused(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, _dead_pid())
    rec = boxes.record(box_id)  # any look at the box (get, list, the next start)
    assert rec.status == BoxStatus.SUSPENDED and rec.started_at == 1000.0 and rec.error is None
    assert not boxes.store.register_supervisor(box_id, token, os.getpid(), None)  # it exits instead of running


def test_a_start_under_way_is_left_alone_and_once_its_supervisor_registered_it_cannot_be_undone(
    tmp_path: Path,
) -> None:
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, os.getpid())  # its process lives: the supervisor may still come
    assert boxes.record(box_id).status == BoxStatus.STARTING
    assert not boxes.store.register_supervisor(box_id, token + 1, os.getpid(), None)  # another start's
    assert boxes.store.register_supervisor(box_id, token, os.getpid(), None)
    assert not boxes.store.roll_back_start(box_id, token, BoxStatus.SUSPENDED, 1000.0)
    assert boxes.store.get_box(box_id).status == BoxStatus.STARTING  # type: ignore[union-attr]


def test_a_slow_start_is_never_undone_while_its_process_lives_but_a_reused_pid_is_not_it(tmp_path: Path) -> None:
    """Undone under a live starter, the start would go on (removing a later start's sockets,
    its supervisor's abort killing that start's box): a minute is no proof of death."""
    boxes = _boxes(tmp_path)
    box_id, _ = _marked(boxes, os.getpid(), age=120)
    assert boxes.record(box_id).status == BoxStatus.STARTING
    since = starting.process_start(os.getpid())
    assert since is not None
    reused, _ = _marked(boxes, os.getpid(), age=120, since=since + 1)  # the pid of another process now
    assert boxes.record(reused).status == BoxStatus.SUSPENDED


def test_a_start_that_lost_the_mark_leaves_the_winners_record_to_undo_it(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, _dead_pid())  # the winner, killed before its supervisor ran
    box_dir = boxes.home.box_dir(box_id)
    loser = starting.Start(token + 0.5, BoxStatus.SUSPENDED, 1000.0, os.getpid(), None)
    starting.record(box_dir, loser)  # written before its compare-and-set, which fails
    assert not boxes.store.transition(box_id, BoxStatus.STARTING, {BoxStatus.SUSPENDED}, started_at=loser.token)
    starting.discard(box_dir, loser.token)
    assert boxes.record(box_id).status == BoxStatus.SUSPENDED  # the winner's record undid it at once
    assert not [p for p in box_dir.iterdir() if p.name.startswith(("start", ".start"))]  # settled: none left


async def test_an_aborted_start_leaves_a_later_starts_box_alone(tmp_path: Path) -> None:
    """A start's abort reads the box again: once another start holds it (its token), the
    processes recorded there are that start's, never killed, and the box is not marked failed."""
    backend = LocalBackend(Home.default(tmp_path))
    box_id, token = _marked(backend.boxes, os.getpid())
    rec = backend.store.get_box(box_id)
    assert rec is not None
    later = subprocess.Popen(["sh", "-c", "sleep 30", box_id])  # "its supervisor": the box's id in its argv
    try:
        assert backend.store.register_supervisor(box_id, token, later.pid, None)
        earlier = starting.Start(token - 5, BoxStatus.SUSPENDED, 1000.0, os.getpid(), None)
        await backend._abort_start(rec, earlier, RuntimeError("the earlier start failed late"))
        assert later.poll() is None
        now = backend.store.get_box(box_id)
        assert now is not None and now.status == BoxStatus.STARTING and now.supervisor_pid == later.pid
    finally:
        later.kill()
        later.wait()
        await backend.close()


async def test_a_supervisor_whose_start_was_undone_touches_nothing_of_the_box(tmp_path: Path) -> None:
    """Registered before any side effect: no live link cleared or made, no QEMU (here a
    command that would leave a mark), no control socket bound."""
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, _dead_pid())
    box_dir = boxes.home.box_dir(box_id)
    (box_dir / TOP).write_bytes(b"")
    mark = tmp_path / "qemu-ran"
    config = {"box_id": box_id, "argv": ["sh", "-c", f"touch {mark}"], "db": str(boxes.home.db)}
    (box_dir / "vm.json").write_text(json.dumps(config | {"home": str(boxes.home.root), "start": token}))
    assert boxes.record(box_id).status == BoxStatus.SUSPENDED  # undone: its starter died
    before = sorted(p.name for p in box_dir.iterdir())
    notify_r, notify_w = os.pipe()
    try:
        await Supervisor(box_dir).run(notify_w)
        assert os.read(notify_r, 2) == b""  # closed without "ok": the starter sees a failed start
    finally:
        os.close(notify_r)
    await asyncio.sleep(0.2)
    assert not mark.exists() and sorted(p.name for p in box_dir.iterdir()) == before
    assert boxes.store.get_box(box_id).supervisor_pid is None  # type: ignore[union-attr]


def test_without_a_record_of_that_start_a_stale_one_fails_as_before(tmp_path: Path) -> None:
    boxes = _boxes(tmp_path)
    box_id, _ = _marked(boxes, _dead_pid(), recorded=False)
    assert boxes.record(box_id).status == BoxStatus.STARTING  # recent: under way, as far as anyone knows
    old, _ = _marked(boxes, _dead_pid(), age=120, recorded=False)
    assert boxes.record(old).status == BoxStatus.FAILED


async def test_a_stop_during_a_start_kills_a_supervisor_that_registered_after_the_box_was_read(
    tmp_path: Path,
) -> None:
    """Stop (or remove --force) reads the box with no supervisor yet; the supervisor then
    registers; the kill must use the pids read after the box left ``starting``, or a VM runs
    on while the box says stopped."""
    boxes = _boxes(tmp_path)
    box_id, token = _marked(boxes, os.getpid())
    rec = boxes.store.get_box(box_id)
    assert rec is not None and rec.supervisor_pid is None
    late = _fake_supervisor(box_id)
    try:
        assert boxes.store.register_supervisor(box_id, token, late.pid, None)
        await boxes.kill(rec)
        assert not pid_is(late.pid, box_id)  # killed (kill waits for it)
    finally:
        late.kill()
        late.wait()
    assert not boxes.store.record_start_qemu(box_id, token, late.pid, 4242)  # no QEMU recorded once stopping


class _StoppedOnRegistration(Store):
    """A stop that lands right after the supervisor registered (the box leaves ``starting``)."""

    def register_supervisor(self, box_id: str, token: float, pid: int, qemu_pid: int | None) -> bool:
        ok = super().register_supervisor(box_id, token, pid, qemu_pid)
        assert self.transition(box_id, BoxStatus.STOPPING, {BoxStatus.STARTING})
        return ok


async def test_a_supervisor_whose_box_was_stopped_after_it_registered_kills_its_qemu(tmp_path: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="sf", dir="/tmp"))  # its ctl.sock path must fit AF_UNIX
    try:
        await _stopped_after_registration(_boxes(short), tmp_path)
    finally:
        shutil.rmtree(short, ignore_errors=True)


async def _stopped_after_registration(boxes: Boxes, tmp_path: Path) -> None:
    box_id, token = _marked(boxes, os.getpid())
    box_dir = boxes.home.box_dir(box_id)
    (box_dir / TOP).write_bytes(b"")
    pidfile = tmp_path / "qemu.pid"
    config = {"box_id": box_id, "argv": ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], "db": str(boxes.home.db)}
    (box_dir / "vm.json").write_text(json.dumps(config | {"home": str(boxes.home.root), "start": token}))
    supervisor = Supervisor(box_dir)
    supervisor.store = _StoppedOnRegistration(boxes.home.db)
    notify_r, notify_w = os.pipe()
    try:
        await asyncio.wait_for(supervisor.run(notify_w), 10)
        assert os.read(notify_r, 2) == b""  # no "ok": the starter sees a failed start
    finally:
        os.close(notify_r)
    assert supervisor.qemu is not None and supervisor.qemu.returncode is not None  # its "QEMU" is gone
    rec = boxes.store.get_box(box_id)
    assert rec is not None and rec.status == BoxStatus.STOPPING and rec.qemu_pid is None


def test_two_starts_of_one_box_in_one_process_each_write_their_own_record(tmp_path: Path) -> None:
    """Threads of one server share its pid: a temp name made from the pid alone was shared
    (FileNotFoundError for one, the other's record under the wrong token)."""
    for _ in range(100):
        box_dir = Path(tempfile.mkdtemp(dir=tmp_path))
        tokens = [time.time(), time.time() + 1]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = [pool.submit(starting.record, box_dir, starting.mine(t, BoxStatus.SUSPENDED, None)) for t in tokens]
            for future in done:
                future.result()
        for token in tokens:
            start = starting.read(box_dir, token)
            assert start is not None and start.token == token
        assert not [p for p in box_dir.iterdir() if p.name.endswith(".tmp")]


async def test_a_start_that_fails_before_its_supervisor_took_the_box_puts_it_back(tmp_path: Path) -> None:
    """A failure in the starter itself (QEMU's argv, vm.json, the zygote refusing a fork, a
    supervisor that died before registering): a suspended box stays suspended with its memory
    state, not failed. Once a supervisor registered, the abort kills it and marks the box failed."""
    backend = LocalBackend(Home.default(tmp_path))
    try:
        box_id, token = _marked(backend.boxes, os.getpid())
        now = backend.store.get_box(box_id)
        assert now is not None
        prior = dataclasses.replace(now, status=BoxStatus.SUSPENDED, started_at=1000.0)  # what the start read
        mine = starting.Start(token, BoxStatus.SUSPENDED, 1000.0, os.getpid(), None)
        assert await backend._abort_start(prior, mine, RuntimeError("the zygote refused to fork"))
        back = backend.store.get_box(box_id)
        assert back is not None and back.status == BoxStatus.SUSPENDED and back.started_at == 1000.0
        assert starting.read(backend.home.box_dir(box_id), token) is None  # settled
        assert not backend.store.register_supervisor(box_id, token, os.getpid(), None)  # a late one exits

        box_id, token = _marked(backend.boxes, os.getpid())
        sup = _fake_supervisor(box_id)
        try:
            assert backend.store.register_supervisor(box_id, token, sup.pid, None)
            prior = dataclasses.replace(prior, id=box_id)
            mine = starting.Start(token, BoxStatus.SUSPENDED, 1000.0, os.getpid(), None)
            assert not await backend._abort_start(prior, mine, RuntimeError("wait_ready timed out"))
            assert not pid_is(sup.pid, box_id)
        finally:
            sup.kill()
            sup.wait()
        failed = backend.store.get_box(box_id)
        assert failed is not None and failed.status == BoxStatus.FAILED
    finally:
        await backend.close()


async def test_a_roll_back_that_raises_leaves_the_start_to_recovery_and_a_lost_one_leaves_no_record(
    tmp_path: Path,
) -> None:
    """The starter's own roll-back failed (the store raised): the record must not keep naming
    this live process, or the box stays ``starting`` for the server's life. One that lost (a
    stop took the box first) removes its record all the same."""
    backend = LocalBackend(Home.default(tmp_path))
    try:
        box_id, token = _marked(backend.boxes, os.getpid())
        prior = backend.store.get_box(box_id)
        assert prior is not None
        mine = starting.Start(token, BoxStatus.SUSPENDED, 1000.0, os.getpid(), None)

        def broken(*_: object) -> bool:
            raise sqlite3.OperationalError("database is locked")

        backend.store.roll_back_start = broken  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError):
            backend._roll_back(prior, mine)
        del backend.store.roll_back_start
        back = backend.boxes.record(box_id)  # the next look at the box undoes it
        assert back.status == BoxStatus.SUSPENDED and back.started_at == 1000.0

        box_id, token = _marked(backend.boxes, os.getpid())
        assert backend.store.transition(box_id, BoxStatus.STOPPING, {BoxStatus.STARTING})  # a stop came first
        prior = dataclasses.replace(prior, id=box_id)
        assert not backend._roll_back(prior, starting.Start(token, BoxStatus.SUSPENDED, 1000.0, os.getpid(), None))
        assert not [p for p in backend.home.box_dir(box_id).iterdir() if p.name.startswith("start")]
    finally:
        await backend.close()


def test_a_start_an_older_boxvm_left_is_undone_from_its_start_json(tmp_path: Path) -> None:
    """An older boxvm wrote one ``start.json`` (owner by pid alone): a box it left ``starting``
    goes back to where it began (its owner dead, or its minute over), not to ``failed``."""
    boxes = _boxes(tmp_path)
    for owner, age, after in (
        (_dead_pid(), 0, BoxStatus.SUSPENDED),
        (os.getpid(), 120, BoxStatus.SUSPENDED),  # a live pid after a minute: its rule then
        (os.getpid(), 0, BoxStatus.STARTING),
    ):
        box_id, token = _marked(boxes, owner, age=age, recorded=False)
        legacy = {"token": token, "prior": "suspended", "prior_started_at": 1000.0, "owner": owner}
        (boxes.home.box_dir(box_id) / "start.json").write_text(json.dumps(legacy))
        assert boxes.record(box_id).status == after


async def test_a_second_start_spawns_only_after_the_first_ones_supervisor_took_the_box(tmp_path: Path) -> None:
    """The spawn lock: a second start (after a stop) reads the record, clears the sockets and
    spawns only once the first start is past its spawn; a cancelled waiter leaves it free, and
    a holder that was SIGKILLed holds nothing."""
    first = await starting.SpawnLock.acquire(tmp_path)
    second = asyncio.ensure_future(starting.SpawnLock.acquire(tmp_path))
    await asyncio.sleep(0.2)
    assert not second.done()
    first.release()
    first.release()  # idempotent: the error paths release again
    (await asyncio.wait_for(second, 2)).release()

    held = await starting.SpawnLock.acquire(tmp_path)
    waiter = asyncio.ensure_future(starting.SpawnLock.acquire(tmp_path))
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    held.release()
    (await asyncio.wait_for(starting.SpawnLock.acquire(tmp_path), 2)).release()

    holder = subprocess.Popen(
        ["python3", "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
         " fcntl.flock(fd,fcntl.LOCK_EX); print('held',flush=True); time.sleep(60)", str(tmp_path / "spawn.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        blocked = asyncio.ensure_future(starting.SpawnLock.acquire(tmp_path))
        await asyncio.sleep(0.2)
        assert not blocked.done()
        holder.kill()
        (await asyncio.wait_for(blocked, 2)).release()
    finally:
        holder.kill()
        holder.wait()


async def test_a_start_cancelled_while_another_spawns_the_box_puts_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start waiting for the spawn lock (another process's start holds it) and cancelled
    there leaves the box where it was, not ``starting`` for the life of this process. (No
    guest bundle in this tier: the start is stopped before anything would use one.)"""
    backend = LocalBackend(Home.default(tmp_path))
    try:
        box_id = os.urandom(16).hex()
        backend.store.insert_box(
            BoxRecord(id=box_id, name="b1", status=BoxStatus.STOPPED, image="x", options={}, mac="m", guest_bundle="g")
        )
        box_dir = backend.home.box_dir(box_id)
        box_dir.mkdir(parents=True)
        bundle = types.SimpleNamespace(id="g", kernel=Path("/k"), initramfs=Path("/i"), rootfs=Path("/r"))
        monkeypatch.setattr(local_mod.bundle_mod, "find", lambda *a, **k: bundle)
        monkeypatch.setattr(local_mod.memory, "fresh_ram", lambda *a, **k: None)
        backend._accel = types.SimpleNamespace(name="kvm")  # (no TSC probe)
        other = await starting.SpawnLock.acquire(box_dir)
        try:
            start = asyncio.ensure_future(backend.start(box_id))
            await asyncio.sleep(0.5)
            assert not start.done()
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
        finally:
            other.release()
        assert backend.boxes.record(box_id).status == BoxStatus.STOPPED
        assert not list(box_dir.glob("start-*.json"))
    finally:
        await backend.close()
