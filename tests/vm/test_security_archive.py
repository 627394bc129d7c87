"""Archive import as an attacker feeds it: bombs (qcow2 tables, tar headers, unused members,
zero streams) must be refused fast with bounded memory, poisoned metadata must never be
committed, and a fuzzer over mutated valid archives finds nothing but ArchiveError.

Each bomb goes through the public paths: ``import_box`` on the local backend and
``POST /v1/boxes/import`` on a real ``boxvm serve``; memory is the peak RSS of the importing
process (this one, or the server's), reset through ``/proc/<pid>/clear_refs`` before each."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boxvm
from boxvm import archive
from boxvm.backends.local import LocalBackend
from boxvm.disks import qcow2
from boxvm.paths import Home
from tests.helpers import leftovers
from tests.vm.test_archive import build, manifest_for, small_disk

pytestmark = pytest.mark.backends("local", "remote")  # async tests run in asyncio mode "auto"
C = qcow2.CLUSTER
MIB = 1 << 20
BUDGET_S, BUDGET_MIB = 5.0, 100


# -- measuring a process -----------------------------------------------------------------
def reset_peak(pid: int) -> float:
    """Reset the peak RSS of ``pid`` to its current RSS (Linux clear_refs 5); returns it, MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid, "VmRSS:")


def peak(pid: int) -> float:
    return _status(pid, "VmHWM:")


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for {pid}")


# -- crafting ------------------------------------------------------------------------------
def zeros(n: int) -> Iterator[bytes]:
    block = bytes(MIB)
    while n:
        k = min(n, MIB)
        yield block if k == MIB else bytes(k)
        n -= k


def write_zst(path: Path, parts: Iterable[bytes]) -> Path:
    with path.open("wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as out:
        for part in parts:
            out.write(part)
    return path


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=fmt)


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + bytes(-len(data) % 512)


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def qcow2_image(virtual: int, clusters: int, l1: dict[int, int], l2: dict[int, dict[int, int]]) -> bytes:
    """A qcow2 laid out by hand: header, L1 at cluster 1, refcount table at 2 (one block at 3);
    ``l1`` maps L1 index -> host cluster of an L2 table, ``l2`` maps such a cluster to its
    entries (index -> raw 64-bit entry)."""
    l1_size = max(1, -(-virtual // (C * (C // 8))))
    image = bytearray(clusters * C)
    head = qcow2.HEADER_V3.pack(
        qcow2.MAGIC, 3, 0, 0, 16, virtual, 0, l1_size, C, 2 * C, 1, 0, 0, 0, 0, 0, 4, qcow2.HEADER_LENGTH
    )
    image[: len(head)] = head
    struct.pack_into(">Q", image, 2 * C, 3 * C)
    for index, cluster in l1.items():
        struct.pack_into(">Q", image, C + index * 8, cluster * C | qcow2.FLAG_COPIED)
    for cluster, entries in l2.items():
        for index, entry in entries.items():
            struct.pack_into(">Q", image, cluster * C + index * 8, entry)
    return bytes(image)


def disk_archive(path: Path, disk: bytes, **overrides: object) -> Path:
    return build(path, [("disk.qcow2", disk), ("manifest.json", manifest_for(disk, **overrides))])


def case_l2_shared(tmp: Path) -> Path:
    """The reported bomb: every L1 entry of a 1 TiB disk points at one L2 table full of zero
    clusters (16 M map entries from a few hundred bytes)."""
    virtual = 1 << 40
    disk = qcow2_image(virtual, 5, {i: 4 for i in range(virtual // (C * C // 8))}, {4: dict.fromkeys(range(C // 8), 1)})
    return disk_archive(tmp / "a", disk, disk_virtual_size=virtual)


def case_data_twice(tmp: Path) -> Path:
    disk = qcow2_image(64 * MIB, 6, {0: 4}, {4: {0: 5 * C | qcow2.FLAG_COPIED, 1: 5 * C | qcow2.FLAG_COPIED}})
    return disk_archive(tmp / "a", disk)


def case_data_over_l1(tmp: Path) -> Path:
    """A data cluster that is the L1 table: a guest write would rewrite the image's tables."""
    disk = qcow2_image(64 * MIB, 5, {0: 4}, {4: {0: 1 * C | qcow2.FLAG_COPIED}})
    return disk_archive(tmp / "a", disk)


def case_huge_virtual(tmp: Path) -> Path:
    """1 PiB virtual: a 16 MiB L1 table (zeros) that the old walk unpacked whole."""
    virtual = 1 << 50
    l1_size = virtual // (C * C // 8)
    disk = bytearray(qcow2_image(virtual, 4 + l1_size * 8 // C, {}, {}))
    struct.pack_into(">Q", disk, 40, 4 * C)  # the L1 table after the refcount block
    return disk_archive(tmp / "a", bytes(disk), disk_virtual_size=virtual)


def case_zero_stream(tmp: Path) -> Path:
    """A 4 GiB disk member that is a 64 MiB qcow2 header and zeros (compresses to ~130 KB)."""
    size = 4 << 30
    head = qcow2_image(64 * MIB, 4, {}, {})
    return write_zst(tmp / "a", [header("disk.qcow2", size), head, *zeros(size - len(head))])


def case_long_name(tmp: Path) -> Path:
    size = 512 * MIB
    return write_zst(tmp / "a", [header("././@LongLink", size, tarfile.GNUTYPE_LONGNAME), *zeros(size)])


def case_pax_header(tmp: Path) -> Path:
    size = 512 * MIB
    return write_zst(tmp / "a", [header("pax", size, tarfile.XHDTYPE), *zeros(size)])


def case_sparse_map(tmp: Path) -> Path:
    """A GNU sparse member whose map goes on for 256 Ki extension blocks (5.5 M entries)."""
    first = bytearray(header("disk.qcow2", 0))
    first[156:157] = tarfile.GNUTYPE_SPARSE
    first[482] = 1
    entry = b"00000000001\0" * 2
    ext = entry * 21 + b"\1" + bytes(7)
    return write_zst(tmp / "a", [with_checksum(first), *(ext for _ in range(256 << 10))])


def case_pax_sparse(tmp: Path) -> Path:
    info = tarfile.TarInfo("disk.qcow2")
    info.size = 512
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(1 << 40)}
    return write_zst(tmp / "a", [info.tobuf(format=tarfile.PAX_FORMAT), bytes(512)])


def case_unused(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        size = 1 << 30
        return write_zst(tmp / "a", [header(name, size), *zeros(size)])

    return make


BOMBS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "every L1 entry on one L2 table": (case_l2_shared, "serves twice"),
    "a data cluster used twice": (case_data_twice, "serves twice"),
    "a data cluster over the L1 table": (case_data_over_l1, "serves twice"),
    "1 PiB virtual size": (case_huge_virtual, "virtual size"),
    "4 GiB of zeros behind a 64 MiB header": (case_zero_stream, "can hold"),
    "512 MiB GNU long name": (case_long_name, "extension header"),
    "512 MiB pax header": (case_pax_header, "extension header"),
    "endless GNU sparse map": (case_sparse_map, "sparse map"),
    "pax sparse member": (case_pax_sparse, "sparse"),
    "1 GiB guest-rootfs.qcow2": (case_unused("guest-rootfs.qcow2"), "not supported"),
    "1 GiB memory.state of zeros": (case_unused("memory.state"), "memory.state is corrupt"),
}


@pytest.fixture(scope="session")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each bomb built once, for both backends."""
    out = {}
    for name, (make, _message) in BOMBS.items():
        d = tmp_path_factory.mktemp("bomb")
        out[name] = make(d)
    return out


@pytest.mark.parametrize("case", list(BOMBS))
async def test_bombs_are_refused_fast_in_bounded_memory(
    rt: boxvm.Runtime, home: Home, bombs: dict[str, Path], case: str, backend_kind: str, request: pytest.FixtureRequest
) -> None:
    path, message = bombs[case], BOMBS[case][1]
    assert path.stat().st_size < 1 * MIB  # each is small on the wire
    server = request.getfixturevalue("server").pid if backend_kind == "remote" else None
    importer = server or os.getpid()
    before = reset_peak(importer)
    t0 = time.monotonic()
    with pytest.raises(boxvm.ArchiveError, match=message):
        await rt.import_box(path, name="t-bomb")
    took, grew = time.monotonic() - t0, peak(importer) - before
    assert took < BUDGET_S, f"refused after {took:.1f} s"
    assert grew < BUDGET_MIB, f"the importer's RSS grew by {grew:.0f} MiB"
    pids = [os.getpid()] + ([server] if server else [])
    assert await rt.get("t-bomb") is None and leftovers(home, pids) == []


# -- poisoned metadata: refused at import, and listing survives a bad record ------------------
def poisoned_boxvm(**box_options: object) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        disk = small_disk(tmp)
        return disk_archive(tmp / "a", disk, box_options=box_options)

    return make


def poisoned_top(**fields: object) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        disk = small_disk(tmp)
        return disk_archive(tmp / "a", disk, **fields)

    return make


def poisoned_boxlite(tmp: Path) -> Path:
    import hashlib
    import json

    disk = small_disk(tmp)
    manifest = {
        "version": 3,
        "image": "alpine:latest",
        "box_options": {"cpus": "many"},
        "guest_disk_checksum": "",
        "container_disk_checksum": "sha256:" + hashlib.sha256(disk).hexdigest(),
    }
    return build(tmp / "a", [("manifest.json", json.dumps(manifest).encode()), ("disk.qcow2", disk)])


POISONED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "Entrypoint 5": (poisoned_boxvm(image_config={"Entrypoint": 5}), "Entrypoint"),
    "Env of numbers": (poisoned_boxvm(image_config={"Env": [1, 2]}), "Env"),
    "image_config a list": (poisoned_boxvm(image_config=["x"]), "image config"),
    "cpus a string": (poisoned_boxvm(cpus="many"), "cpus"),
    "ports not pairs": (poisoned_boxvm(ports=[5]), "ports"),
    "env a list": (poisoned_boxvm(env=["A=1"]), "env"),
    "box_options a string": (poisoned_top(box_options="x"), "box options"),
    "image a number": (poisoned_top(image=5), "image"),
    "image_digest junk": (poisoned_top(image_digest="../../etc"), "image_digest"),
    "box_name 10k": (poisoned_top(box_name="x" * 10_000), "box_name"),
    "virtual size a bool": (poisoned_top(disk_virtual_size=True), "disk_virtual_size"),
    "BoxLite cpus 'many'": (poisoned_boxlite, "cpus must be an integer"),
    "deeply nested JSON": (
        lambda tmp: build(tmp / "a", [("disk.qcow2", small_disk(tmp)), ("manifest.json", b"[" * 100_000)]),
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(POISONED))
async def test_poisoned_metadata_is_refused_before_commit(
    rt: boxvm.Runtime, home: Home, tmp_path: Path, case: str, backend_kind: str, request: pytest.FixtureRequest
) -> None:
    make, message = POISONED[case]
    pids = [os.getpid()] + ([request.getfixturevalue("server").pid] if backend_kind == "remote" else [])
    with pytest.raises(boxvm.ArchiveError, match=message):
        await rt.import_box(make(tmp_path), name="t-poisoned")
    assert await rt.get("t-poisoned") is None and leftovers(home, pids) == []
    await rt.list()


async def test_one_unreadable_record_does_not_break_the_list(rt: boxvm.Runtime, local: LocalBackend) -> None:
    """A record stored before validation (or damaged) is listed as failed; others list fine."""
    box = await rt.create(name=f"t-bad-record-{os.urandom(2).hex()}")
    try:
        rec = local.store.get_box(box.id)
        assert rec is not None
        poisoned = {**rec.options, "image_config": {"Entrypoint": 5}, "disk_size_gb": "x"}
        local.store.update_box(box.id, options=poisoned)
        listed = {info.id: info for info in await rt.list()}
        assert listed[box.id].status == boxvm.BoxStatus.FAILED and "remove the box" in (listed[box.id].error or "")
    finally:
        await rt.remove(box.id, force=True)


# -- fuzzing the reader and the qcow2 parser ------------------------------------------------
pytest_fuzz = pytest.mark.backends("local")
FUZZ = settings(
    max_examples=250,
    deadline=None,  # bounded below, with a clear message, per example
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A small valid archive made by our own writer (no VM): (its disk, the plain tar)."""
    d = tmp_path_factory.mktemp("seed")
    top = d / "top.qcow2"
    qcow2.write_overlay(top, 8 * MIB, None)
    io_cmds = ["-c", "write -P 0x42 0 64k", "-c", "write -P 0x17 1M 192k", "-c", "write -z 4M 64k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *io_cmds, str(top)], check=True, capture_output=True)
    raw = io.BytesIO()
    manifest = archive.write_stream(top, raw, {"box_name": "fuzz", "image": "x"}, compress=False, level=3)
    flat = d / "flat.qcow2"
    flat.write_bytes(b"".join(bytes(c) for c in qcow2.flatten_plan(top).chunks()))
    assert manifest["members"]["disk.qcow2"] == flat.stat().st_size
    return flat.read_bytes(), raw.getvalue()


def read_bounded(data: bytes, tmp: Path) -> None:
    """Import ``data`` as the reader does; only ArchiveError may come out, within budget."""
    work = tmp / f"work-{os.urandom(4).hex()}"
    work.mkdir()
    before = reset_peak(os.getpid())
    t0 = time.monotonic()
    try:
        archive.read_archive(io.BufferedReader(io.BytesIO(data)), work, 1 << 30, label="fuzz")  # type: ignore[arg-type]
    except boxvm.ArchiveError:
        pass
    finally:
        took, grew = time.monotonic() - t0, peak(os.getpid()) - before
        shutil.rmtree(work)
    assert took < BUDGET_S and grew < BUDGET_MIB, (took, grew)
    assert os.listdir(tmp) == []  # nothing written outside the work directory


# Mutations are drawn as small tuples and applied to the seed in the test, so hypothesis
# shows (and shrinks) the operations, not megabytes of archive.
BYTE_OPS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "overwrite", "splice"]),
        st.integers(0, 1 << 32),
        st.integers(0, 1 << 32),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=3,
)


def mutate(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    for kind, a, b, junk in ops:
        if not data:
            break
        at = a % len(data)
        if kind == "flip":
            data = data[:at] + bytes([data[at] ^ (1 << b % 8)]) + data[at + 1 :]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "overwrite":
            data = data[:at] + junk + data[at + len(junk) :]
        else:
            data = data[:at] + data[b % len(data) :]
    return data


HEADER_FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4), (60, 4)]
HEADER_FIELDS += [(64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4)]
VALUES = [0, 1, 8, 512, C - 8, 1 << 30, 1 << 40, 1 << 62, (1 << 64) - 1]
DISK_OPS = st.lists(
    st.tuples(st.sampled_from(["header", "l1", "l2", "bytes"]), st.integers(0, 1 << 32), st.integers(0, 1 << 32)),
    min_size=1,
    max_size=4,
)


def mutate_disk(disk: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    """Header fields or table entries set to hostile values (the tables are found from the
    header, so L1 and L2 entries are hit, not just bytes): sizes, offsets past the end, and
    offsets of every cluster of the file (metadata included) with and without flags."""
    image = bytearray(disk)
    n = len(image) // C
    values = VALUES + [(n - 1) * C, n * C] + [k * C | f for k in range(n) for f in (0, qcow2.FLAG_COPIED, 1)]
    for where, a, b in ops:
        value = values[b % len(values)]
        if where == "header":
            offset, width = HEADER_FIELDS[a % len(HEADER_FIELDS)]
            image[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        elif where in ("l1", "l2"):
            l1 = int.from_bytes(disk[40:48], "big")
            table = l1 if where == "l1" else int.from_bytes(disk[l1 : l1 + 8], "big") & qcow2.L2_OFFSET_MASK
            at = table + 8 * (a % 16)
            image[at : at + 8] = value.to_bytes(8, "big")
        else:
            image[a % len(image)] ^= 1 << b % 8
    return bytes(image)


@pytest_fuzz
@FUZZ
@given(compress=st.booleans(), ops=BYTE_OPS)
def test_fuzz_archive_reader(
    seed: tuple[bytes, bytes], tmp_path: Path, compress: bool, ops: list[tuple[str, int, int, bytes]]
) -> None:
    _disk, plain = seed
    case = tmp_path / "case"
    case.mkdir(exist_ok=True)
    read_bounded(mutate(zstandard.ZstdCompressor().compress(plain) if compress else plain, ops), case)


@pytest_fuzz
@FUZZ
@given(ops=DISK_OPS)
def test_fuzz_qcow2_tables(seed: tuple[bytes, bytes], tmp_path: Path, ops: list[tuple[str, int, int]]) -> None:
    """Mutated disks inside archives whose checksums and sizes agree, so every example
    reaches the qcow2 checks; the table parser alone raises only ValueError."""
    disk, _plain = seed
    image = mutate_disk(disk, ops)
    path = tmp_path / "disk.qcow2"
    path.write_bytes(image)
    for walk in (qcow2.check, qcow2.allocation):
        with contextlib.suppress(ValueError):
            walk(path)
    path.unlink()
    virtual = int.from_bytes(image[24:32], "big")
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, body in (("disk.qcow2", image), ("manifest.json", manifest_for(image, disk_virtual_size=virtual))):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    case = tmp_path / "case"
    case.mkdir(exist_ok=True)
    read_bounded(plain.getvalue(), case)
