"""Memory state in exports, imports and over REST (issue 15), and what a suspended box refuses.

One source box (slim image, 256 MiB, a published port) runs a background counter and a TCP
server, writes a disk marker and is suspended; the tests export it, import it locally and
over REST, and resume the copies. "Resumed, not booted" is judged by the guest kernel's
boot_id (new at every boot) and by the TCP server's pid and connection count.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import zstandard

import boxvm
from boxvm import memarchive
from boxvm.backends.local import LocalBackend
from boxvm.engine import memory, qemucaps
from boxvm.errors import ArchiveError, InvalidState, StorageError, Unsupported
from boxvm.options import BoxOptions, CloneOptions, SnapshotOptions
from boxvm.paths import Home
from boxvm.status import BoxStatus
from tests.conftest import TOKEN, Server
from tests.helpers import in_process, rewrite_member, started

# One worker runs them all, in order: they share one box (make test: -n 2 --dist loadgroup).
pytestmark = [pytest.mark.asyncio, pytest.mark.xdist_group("memory-transfer")]

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done"
# Answers each connection with its pid and how many connections it has served.
TCP_SERVER = (
    "import os, socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('', 8000)); s.listen()\n"
    "n = 0\n"
    "while True:\n"
    "    c, _ = s.accept(); n += 1; c.sendall(f'{os.getpid()} {n}\\n'.encode()); c.close()\n"
)


async def sh(box: boxvm.Box, script: str) -> str:
    result = await box.exec(["sh", "-c", script])
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


async def reading(box: boxvm.Box) -> tuple[str, int]:
    boot_id, count = (await sh(box, "cat /proc/sys/kernel/random/boot_id /tmp/count")).split()
    return boot_id, int(count)


async def ask(port: int, within: float = 60.0) -> tuple[int, int]:
    """(pid, connections served) from the guest's TCP server through the published port
    (a guest's first python3 may take tens of seconds on a loaded host: retried until then)."""
    last: object = None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            if line:
                pid, n = line.split()
                return int(pid), int(n)
            last = "an empty answer"
        except OSError as exc:
            last = exc
        await asyncio.sleep(0.25)
    raise AssertionError(f"the guest's TCP server did not answer on port {port}: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Source:
    rt: boxvm.Runtime
    box: boxvm.Box
    port: int
    boot_id: str
    count: int  # the counter when it was suspended (at least)
    marker: str  # on its disk
    server_pid: int
    served: int  # connections the TCP server has answered
    archives: Path  # a directory for this module's archives


@pytest_asyncio.fixture(scope="module")
async def source(home: Home, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Source]:
    rt = boxvm.Runtime(home.root)
    port = free_port()
    options = BoxOptions(image="boxvm/slim", memory_mib=256, network="nat", ports=[(port, 8000)])
    box = await rt.create(options, name=f"memxfer-{os.urandom(2).hex()}")
    try:
        await box.start()
        marker = os.urandom(8).hex()
        await sh(box, f"echo {marker} > /root/marker && sync")
        await box.exec(["sh", "-c", f"cat > /tmp/server.py <<'EOF'\n{TCP_SERVER}EOF"])
        await sh(box, f"nohup sh -c '{COUNTER}' >/dev/null 2>&1 & nohup python3 /tmp/server.py >/dev/null 2>&1 &")
        pid, served = await ask(port)
        boot_id, count = await reading(box)  # the counter at the suspend is at least this
        info = await box.suspend()
        assert info.status == BoxStatus.SUSPENDED
        yield Source(rt, box, port, boot_id, count, marker, pid, served, tmp_path_factory.mktemp("archives"))
    finally:
        await rt.remove(box.id, force=True)
        await rt.close()


async def _ensure_suspended(src: Source) -> None:
    if (await src.box.info()).status != BoxStatus.SUSPENDED:
        await src.box.suspend()


async def test_a_tcp_server_answers_through_its_published_port_after_suspend_and_start(source: Source) -> None:
    box = source.box
    info = await box.start()
    assert info.status == BoxStatus.RUNNING
    pid, served = await ask(source.port)
    assert (pid, served) == (source.server_pid, source.served + 1), "the TCP server was restarted, not resumed"
    boot_id, count = await reading(box)
    source.boot_id, source.count = boot_id, count
    await asyncio.sleep(0.3)
    assert (await reading(box))[1] > count, "the background counter stopped"
    source.served = served
    await box.suspend()


def _plain(archive: Path) -> bytes:
    """The tar inside a zstd-compressed archive."""
    with open(archive, "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def _members(tar_bytes: bytes) -> tuple[list[str], dict]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return tar.getnames(), json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]


async def test_a_suspended_box_travels_with_its_memory_through_export_rest_and_import(
    source: Source, server: Server
) -> None:
    """Exported locally, imported over REST (the server runs the same import a local runtime
    does): the copy resumes the source's processes where they were. (An export over REST is
    the fork's, in the last test.)"""
    await _ensure_suspended(source)
    t0 = time.monotonic()
    path = await source.box.export(source.archives / "suspended.boxsnap")
    export_s = time.monotonic() - t0
    assert (await source.box.info()).status == BoxStatus.SUSPENDED  # the source keeps its status and state
    names, manifest = _members(_plain(path))
    assert names == ["disk.qcow2", "memory.state", "manifest.json"]
    assert manifest["version"] == 2 and manifest["memory_state_checksum"].startswith("sha256:")
    assert manifest["memory"]["memory_mib"] == 256 and manifest["memory"]["machine"] == "microvm"
    assert manifest["consistency"] == "suspended"
    remote = boxvm.Runtime.remote(server.url, token=TOKEN)
    try:
        box = await remote.get(source.box.id)
        assert box is not None and (await box.info()).status == BoxStatus.SUSPENDED
        t0 = time.monotonic()
        copy = await remote.import_box(path, name=f"{source.box.name}-copy", untrusted=True)
        import_s = time.monotonic() - t0
        try:
            assert (await copy.info()).status == BoxStatus.SUSPENDED
            t0 = time.monotonic()
            await copy.start()
            resume_s = time.monotonic() - t0
            boot_id, count = await reading(copy)
            assert boot_id == source.boot_id, "the imported box booted instead of resuming"
            assert count >= source.count
            assert await sh(copy, "cat /root/marker") == source.marker
            assert await sh(copy, f"kill -0 {source.server_pid} && echo alive") == "alive"  # the server too
            # another box's guest: re-identified as a fork is (the manifest's record is marked so)
            assert await sh(copy, "hostname; cat /etc/machine-id") == f"{copy.name}\n{copy.id}"
            print(f"\nexport {export_s:.2f} s ({path.stat().st_size >> 20} MiB), import over REST {import_s:.2f} s,"
                  f" start (resume) {resume_s:.2f} s")  # fmt: skip
            await copy.stop()
            with pytest.raises(InvalidState, match="no memory to capture"):  # a stopped box has no memory
                await copy.snapshot.create("m", SnapshotOptions(memory=True))
        finally:
            await remote.remove(copy.id, force=True)
    finally:
        await remote.close()


async def test_an_import_that_could_not_resume_is_refused_and_leaves_nothing(source: Source, home: Home) -> None:
    """Two real cases (each refusal of the format is a unit test in tests/unit/test_memory_archive.py)."""
    archive = source.archives / "suspended.boxsnap"
    if not archive.exists():
        await _ensure_suspended(source)
        await source.box.export(archive)
    plain = _plain(archive)
    ours = source.box.name  # an import takes this name or it with a suffix; tests on other workers share the home

    async def boxes() -> set[str]:
        return {b.id for b in await source.rt.list() if b.name.startswith(ours)}

    before = await boxes()

    def bundle(body: bytes) -> bytes:
        m = json.loads(body)
        m["memory"]["guest_bundle"] = "another-bundle"
        return json.dumps(m).encode()

    with pytest.raises(ArchiveError, match="guest bundle 'another-bundle'"):
        other = source.archives / "bundle.boxsnap"
        other.write_bytes(rewrite_member(plain, "manifest.json", bundle))
        await source.rt.import_box(other)
    truncated = source.archives / "truncated.boxsnap"
    truncated.write_bytes(plain[: plain.index(b"BOXVMMEM") + (1 << 20)])  # cut inside memory.state
    with pytest.raises(ArchiveError, match="truncated"):
        await source.rt.import_box(truncated)
    assert await boxes() == before, "a refused import left a box"
    mine = str(os.getpid())  # staging names carry their process's pid
    staged = [p for p in home.tmp.iterdir() if p.name.startswith(("archive-", "import")) and mine in p.name.split("-")]
    assert not staged, "staging left behind"


async def test_a_suspended_box_is_exported_with_its_memory_but_not_snapshotted_or_cloned(source: Source) -> None:
    """Its disk alone would drop its processes (a memory snapshot of it, which keeps them,
    is ``test_forks``'s)."""
    await _ensure_suspended(source)
    box = source.box
    for attempt in (
        lambda: box.snapshot.create("disk"),
        lambda: box.clone(f"{box.name}-clone"),
        lambda: box.clone_many(2, options=CloneOptions()),
        lambda: box.stop(),
    ):
        with pytest.raises(InvalidState, match="suspended"):
            await attempt()
    assert (await box.info()).status == BoxStatus.SUSPENDED
    assert await box.snapshot.list() == []


def _qemu_without_memory_files(directory: Path) -> Path:
    """A QEMU that refuses ``memory-backend-file`` as a build without it does: the real
    binary, given the object under a type name it does not know."""
    real = qemucaps.qemu_binary()
    wrapper = directory / "qemu-system-x86_64"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a; do shift; set -- "$@" "$(printf %s "$a" | sed s/^memory-backend-file,/memory-backend-none,/)"; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


async def test_a_host_whose_qemu_cannot_keep_memory_says_unsupported(
    source: Source, home: Home, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wrapper = _qemu_without_memory_files(tmp_path)
    caps = qemucaps.probe(home.cache, str(wrapper))
    assert not caps.memory_state and "memory-backend-none" in caps.reason, caps
    assert qemucaps.probe(home.cache, str(wrapper)) is caps  # probed once, then cached
    assert str(wrapper) in (home.cache / qemucaps.CACHE_FILE).read_text()
    box = source.box
    await box.start()  # on the real QEMU
    try:
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # the host's QEMU is now the wrapper
        with pytest.raises(Unsupported, match="cannot keep memory state"):
            await box.suspend()
        with pytest.raises(Unsupported, match="cannot keep memory state"):
            await box.snapshot.create("m", SnapshotOptions(memory=True))
        # The real app and client in this process (a server process would cost a start-up):
        # its backend probes the QEMU on this PATH, and the class travels over REST.
        async with in_process(home.root, TOKEN) as api:
            remote = boxvm.Runtime(backend=api.client(TOKEN))
            try:
                again = await remote.get(box.id)
                assert again is not None
                with pytest.raises(Unsupported, match="cannot keep memory state"):
                    await again.suspend()
            finally:
                await remote.close()
        assert (await box.info()).status == BoxStatus.RUNNING
        assert await sh(box, "cat /root/marker") == source.marker
        monkeypatch.undo()
        await box.suspend()  # on the real QEMU
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        with pytest.raises(Unsupported, match=r"cannot resume box.*cannot keep memory state"):
            await box.start()
        assert (await box.info()).status == BoxStatus.SUSPENDED  # its state kept for a QEMU that can
    finally:
        monkeypatch.undo()
        await _ensure_suspended(source)


async def test_a_corrupt_state_file_at_start_leaves_a_stopped_box(source: Source, home: Home) -> None:
    """Last: it spends the source's saved state. A byte changed in place (the size stays) is
    seen by the checksum; the cold boot after such a refusal is tests/vm/test_memory.py's."""
    await _refuse_corrupt_state(source, home)


async def _refuse_corrupt_state(source: Source, home: Home) -> None:
    await _ensure_suspended(source)
    state = home.box_dir(source.box.id) / memory.STATE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"cannot resume.*boot it cold") as err:
        await source.box.start()
    assert str(home.root) not in str(err.value)
    assert (await source.box.info()).status == BoxStatus.STOPPED
    assert not state.exists()


async def test_after_that_it_boots_cold_and_a_snapshot_of_another_memory_size_is_not_resumed(
    source: Source, home: Home, server: Server
) -> None:
    """No API changes a box's memory size (options are fixed at create; an import is a new
    box), so a snapshot cannot meet another size through the API: the record is edited here,
    as a future resize would, to show the guard a restore passes (engine/memory.check)."""
    box = source.box
    if (await box.info()).status != BoxStatus.STOPPED:  # run alone: the corrupt state first
        await _refuse_corrupt_state(source, home)
    await box.start()  # a cold boot, with its disk
    assert await sh(box, "cat /root/marker") == source.marker
    assert await sh(box, "cat /proc/sys/kernel/random/boot_id") != source.boot_id
    await sh(box, f"nohup sh -c '{COUNTER}' >/dev/null 2>&1 & {started('/tmp/count')}")  # running in the snapshot
    await box.snapshot.create("m", SnapshotOptions(memory=True))
    await box.stop()
    await _a_fork_travels_with_its_memory(source, "m", server)
    backend = LocalBackend(home)
    try:
        rec = backend.store.get_box(box.id)
        assert rec is not None
        backend.store.update_box(box.id, options={**rec.options, "memory_mib": 512})
        with pytest.raises(StorageError, match=r"memory size.*boot it cold"):
            await box.snapshot.restore("m")
        assert (await box.info()).status == BoxStatus.STOPPED
        backend.store.update_box(box.id, options=rec.options)
    finally:
        await backend.close()


async def _a_fork_travels_with_its_memory(source: Source, snapshot: str, server: Server) -> None:
    """A fork of a memory snapshot runs on the snapshot's RAM file mapped privately; its
    suspend gives it a RAM file of its own (the snapshot's with the pages the fork wrote
    over it) and a state of its devices alone, and its export (over REST), import and
    start resume its processes where they were (issue 15: forks in archives)."""
    t0 = time.monotonic()
    (fork,) = await source.box.clone_many(1, CloneOptions(from_snapshot=snapshot, start_after_clone=True))
    copy = None
    remote = boxvm.Runtime.remote(server.url, token=TOKEN)
    try:
        boot_id, count = await reading(fork)  # the snapshot's counter, running on in the fork
        await asyncio.sleep(0.2)
        assert (await reading(fork))[1] > count
        fork_over_rest = await remote.get(fork.id)
        assert fork_over_rest is not None
        await fork_over_rest.suspend()
        path = await fork_over_rest.export(source.archives / "fork.boxsnap")
        plain = _plain(path)
        _, manifest = _members(plain)
        assert manifest["memory"]["memory_mib"] == 256
        at = plain.index(memarchive.MAGIC)
        assert int.from_bytes(plain[at + 12 : at + 16], "little") == 0, "the fork's RAM is not a file of its own"
        assert (await fork_over_rest.info()).timings["suspend_written_mib"] > 0
        copy = await source.rt.import_box(path, name=f"{fork.name}-copy")
        await copy.start()
        copy_boot, copy_count = await reading(copy)
        assert copy_boot == boot_id, "the imported fork booted instead of resuming"
        assert copy_count >= count and await sh(copy, "cat /root/marker") == source.marker
        await asyncio.sleep(0.2)
        assert (await reading(copy))[1] > copy_count, "the counter did not survive the fork's export"
        print(f"\nfork, suspend, export, import, resume: {time.monotonic() - t0:.2f} s")
    finally:
        await remote.close()
        for box in (fork, copy):
            if box is not None:
                await source.rt.remove(box.id, force=True)
