"""The typed QMP layer against a real QEMU (``-machine none``: a monitor, no guest).

Each command boxvm sends is exercised once, and every kind of failure (a refusal, a
monitor that went away) must arrive as an EngineError that names the command, keeps
QEMU's reply and shows no host path."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from boxvm.engine import memory, memory_live
from boxvm.engine.qmp import QMP, QMPCommandError
from boxvm.errors import EngineError, InvalidState


@contextlib.asynccontextmanager
async def _qemu(work: Path, *extra: str, name: str = "qmp") -> AsyncIterator[QMP]:
    """A QEMU with ``-machine none`` (plus ``extra``) and its monitor, killed at the end."""
    sock = work / f"{name}.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{sock},server=on,wait=off", *extra,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    monitor = QMP("test")
    for _ in range(500):  # QEMU binds the socket a moment before it listens
        with contextlib.suppress(EngineError):
            await monitor.connect(sock)
            break
        await asyncio.sleep(0.01)
    try:
        yield monitor
    finally:
        with contextlib.suppress(Exception):
            await monitor.disconnect()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest_asyncio.fixture
async def qmp() -> AsyncIterator[tuple[QMP, Path]]:
    with tempfile.TemporaryDirectory(prefix="qmp-") as tmp:  # short: a socket path has ~108 bytes
        async with _qemu(Path(tmp)) as monitor:
            yield monitor, Path(tmp)


def _qcow2(path: Path, backing: Path | None = None) -> Path:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "16M"], check=True)
    return path


async def _until(monitor: QMP, status: str) -> None:
    """Poll the migration until its status is ``status`` (for up to ~5 s)."""
    for _ in range(500):
        if (await monitor.query_migrate()).get("status") == status:
            return
        await asyncio.sleep(0.01)


async def test_run_state_and_block_commands(qmp: tuple[QMP, Path]) -> None:
    monitor, work = qmp
    assert await monitor.status() == "running"
    await monitor.stop()
    assert await monitor.status() == "paused"
    await monitor.cont()
    assert await monitor.status() == "running"
    await monitor.blockdev_add_qcow2("base", _qcow2(work / "base.qcow2"))
    await monitor.blockdev_add_qcow2("top", _qcow2(work / "top.qcow2", work / "base.qcow2"))
    assert await monitor.backing_node("top") is None  # opened without its backing
    await monitor.snapshot("base", "top")
    assert await monitor.backing_node("top") == "base"
    assert await monitor.job("nothing") is None


async def test_migration_commands(qmp: tuple[QMP, Path]) -> None:
    monitor, work = qmp
    await monitor.migrate_set_capabilities({"x-ignore-shared": True})
    await monitor.migrate_set_parameters({"max-bandwidth": 1 << 30})
    assert (await monitor.query_migrate()).get("status") in (None, "none")
    (work / "empty.state").touch()
    with pytest.raises(QMPCommandError) as refused:
        await monitor.migrate_incoming_from(work / "empty.state")  # only a QEMU started with -incoming accepts it
    assert refused.value.command == "migrate-incoming"


async def test_a_refusal_is_an_engine_error_with_command_and_reply(qmp: tuple[QMP, Path]) -> None:
    monitor, work = qmp
    with pytest.raises(EngineError) as refused:
        await monitor.blockdev_del("no-such-node")
    err = refused.value
    assert isinstance(err, QMPCommandError) and err.code == "EngineError"
    assert err.command == "blockdev-del" and err.arguments == {"node-name": "no-such-node"}
    assert err.error_class == "GenericError" and "no-such-node" in err.reply["desc"]  # type: ignore[index]
    assert "'blockdev-del'" in err.message and "no-such-node" in err.message
    missing = work / "missing.qcow2"
    with pytest.raises(QMPCommandError) as refused:
        await monitor.blockdev_add_qcow2("gone", missing)
    assert str(missing) in refused.value.reply["desc"]  # type: ignore[index]  # the log keeps it all
    assert str(work) not in refused.value.message and "missing.qcow2" in refused.value.message  # a caller does not


async def test_a_monitor_that_went_away_is_an_engine_error(qmp: tuple[QMP, Path]) -> None:
    monitor, _work = qmp
    await monitor.quit()
    with pytest.raises(QMPCommandError) as gone:
        await monitor.status()
    assert gone.value.reply is None and gone.value.command == "query-status"
    assert "monitor closed" in gone.value.message


async def test_a_live_save_switches_the_disk_in_pre_switchover_and_runs_on(qmp: tuple[QMP, Path]) -> None:
    """``memory_live``: QEMU holds the VM in ``finish-migrate`` with the migration in
    ``pre-switchover`` while the caller's disk capture (a ``transaction``) runs; ``cont``
    after completion runs it again. A capture that fails there cancels the migration and
    the VM can run on; ``limit_s=0`` is the stop-and-copy, said so; a pause meanwhile stands."""
    monitor, work = qmp
    await monitor.blockdev_add_qcow2("base", _qcow2(work / "base.qcow2"))
    await monitor.blockdev_add_qcow2("top", _qcow2(work / "top.qcow2", work / "base.qcow2"))
    seen: list[str] = []

    async def at_stop() -> None:
        seen.extend([await monitor.status(), (await monitor.query_migrate())["status"]])
        await monitor.snapshot("base", "top")

    saved = await memory_live.save(monitor, work / "state", at_stop, resume=lambda: True)
    assert seen == ["finish-migrate", "pre-switchover"]
    assert await monitor.status() == "running" and (await monitor.query_migrate())["status"] == "completed"
    assert saved.fallback is None and saved.passes >= 1 and (work / "state").stat().st_size > 0
    assert await monitor.backing_node("top") == "base"

    async def failing() -> None:
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        await memory_live.save(monitor, work / "state", failing, resume=lambda: True)
    await _until(monitor, "cancelled")
    assert (await monitor.query_migrate())["status"] == "cancelled"
    await monitor.cont()  # as the supervisor does after a failed save (QEMU restarts only a VM it stopped itself)
    assert await monitor.status() == "running"

    saved = await memory_live.save(monitor, work / "state", None, resume=lambda: True, limit_s=0)
    assert saved.fallback == "stop-and-copy asked for" and await monitor.status() == "running"

    # A client paused the box meanwhile, here during the stop across the migration's start
    # (the supervisor's op_pause: ``resume()`` is False from then on): the guest never runs again.
    with monitor.listen("RESUME") as resumed:
        saved = await memory_live.save(monitor, work / "state", monitor.stop, resume=lambda: False)
        with pytest.raises(TimeoutError):
            await resumed.next(0.2)
    assert saved.fallback == "paused by a client"
    assert await monitor.status() == "postmigrate"  # left stopped; the client's resume is a cont
    # QEMU 7.2 refuses to migrate it again ("paused due to previous migration"): boxvm says to
    # resume the box first rather than run the guest itself; a disk capture still works.
    with pytest.raises(InvalidState, match="resume the box"):
        await memory_live.save(monitor, work / "state", None, resume=lambda: False)
    assert await monitor.status() == "postmigrate"
    await monitor.blockdev_add_qcow2("top2", _qcow2(work / "top2.qcow2", work / "top.qcow2"))
    await monitor.snapshot("top", "top2")
    assert await monitor.backing_node("top2") == "top"
    await monitor.cont()
    assert await monitor.status() == "running"
    await memory_live.save(monitor, work / "state", None, resume=lambda: True)
    assert await monitor.status() == "running"


def _qemu_holds(work: Path, path: Path) -> bool:
    """Whether the QEMU serving ``work``'s monitor has ``path`` open."""
    import psutil

    (qemu,) = [p for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])]
    return any(f.path.startswith(str(path)) for f in qemu.open_files())


async def _save_into(monitor: QMP, path: Path, prefill: int = 0) -> int:
    """A whole migration into a new ``memory.StateFile`` prefilled with ``prefill`` bytes;
    the stream's size. The VM runs again after (a completed migration leaves it stopped)."""
    state = memory.StateFile(path)
    try:
        assert state.prefill(prefill) == prefill
        await monitor.migrate_to_fd(state.fd)
        await _until(monitor, "completed")
        written = path.stat().st_size
        size = state.finish()
        assert written == max(prefill, size)
    finally:
        state.close()
    await monitor.cont()
    return size


async def test_a_prefilled_state_file_holds_exactly_the_stream(qmp: tuple[QMP, Path]) -> None:
    """QEMU writes a prefilled ``memory.StateFile`` from its start through the shared file
    offset, and ``finish`` cuts it there, the prefill longer or shorter than the stream: a
    stream of the length of a save into a file not prefilled, ending in the same device
    description (the clocks inside differ from save to save)."""
    monitor, work = qmp
    fresh = work / "fresh.state"
    size = await _save_into(monitor, fresh)
    assert size == fresh.stat().st_size > 64
    for prefill in (1 << 20, 16):
        path = work / f"prefilled-{prefill}.state"
        assert await _save_into(monitor, path, prefill) == size
        saved, plain = path.read_bytes(), fresh.read_bytes()
        assert saved[:8] == plain[:8] == b"QEVM\0\0\0\3" and saved[-256:] == plain[-256:]
        assert saved[-1:] == b"}"  # the JSON description: no zeros of the prefill after it


async def test_the_devices_alone_are_saved_and_load_where_the_loader_expects_no_configuration(
    qmp: tuple[QMP, Path],
) -> None:
    """``save_devices`` (a private RAM's memory snapshot): the VM stays paused with its
    block devices active, the file keeps the mode it was made with, and its stream has no
    configuration section: a QEMU started with ``migration.send-configuration=off`` loads
    it, one started without does not."""
    monitor, work = qmp
    await monitor.blockdev_add_qcow2("base", _qcow2(work / "base.qcow2"))
    await monitor.stop()
    state = work / "devices.state"
    memory.StateFile(state).close()
    await monitor.save_devices(state)
    assert await monitor.status() == "paused" and state.stat().st_mode & 0o777 == 0o600
    assert not memory.has_configuration(state)
    await monitor.blockdev_add_qcow2("top", _qcow2(work / "top.qcow2", work / "base.qcow2"))
    await monitor.snapshot("base", "top")  # a disk switch needs the nodes active
    await monitor.cont()
    assert await monitor.status() == "running"
    async with _qemu(work, "-incoming", "defer", "-global", "migration.send-configuration=off", name="l") as loader:
        await loader.migrate_incoming_from(state)
        await _until(loader, "completed")
        assert (await loader.query_migrate())["status"] == "completed"
    async with _qemu(work, "-incoming", "defer", name="strict") as strict:
        await strict.migrate_incoming_from(state)
        with pytest.raises(EngineError, match="monitor closed"):  # 7.2 exits on a failed incoming migration
            await _until(strict, "completed")


async def _migrate_to(monitor: QMP, path: Path) -> None:
    """``migrate_to_fd`` of a new state file, whose descriptor is then closed here: QEMU holds its own."""
    state = memory.StateFile(path)
    try:
        await monitor.migrate_to_fd(state.fd)
    finally:
        state.close()


async def test_a_save_hands_qemu_its_file_and_a_refused_one_takes_it_back(qmp: tuple[QMP, Path]) -> None:
    """``migrate_to_fd``: QEMU writes the file boxvm opened and closes it when the
    migration ends; a second ``migrate`` while one is held in ``pre-switchover`` is refused,
    and QEMU does not keep that file open (``closefd``). The file must be new (O_EXCL)."""
    monitor, work = qmp
    done = work / "done.state"
    await _migrate_to(monitor, done)
    await _until(monitor, "completed")
    assert done.stat().st_size > 0 and done.stat().st_mode & 0o777 == 0o600
    assert not _qemu_holds(work, done)
    with pytest.raises(EngineError, match="File exists"):
        await _migrate_to(monitor, done)
    await monitor.cont()

    await monitor.migrate_set_capabilities({"pause-before-switchover": True})
    held, refused = work / "held.state", work / "refused.state"
    await _migrate_to(monitor, held)
    await _until(monitor, "pre-switchover")
    assert (await monitor.query_migrate())["status"] == "pre-switchover" and _qemu_holds(work, held)
    with pytest.raises(QMPCommandError) as second:
        await _migrate_to(monitor, refused)
    assert second.value.command == "migrate" and refused.exists()
    assert not _qemu_holds(work, refused)
    await monitor.migrate_cancel()
    await _until(monitor, "cancelled")
    assert not _qemu_holds(work, held)
