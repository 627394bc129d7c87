"""``qcow2.read_header`` reads a header's first 4 KiB and reads the whole header cluster
again only when a field reaches past them: for any header -- well-formed or hostile, its
backing name and extensions anywhere in the cluster -- it must parse exactly as one read of
the whole cluster does, or fail the same way."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from boxvm.disks import qcow2


def _whole(path: Path) -> qcow2.Header | str:
    with open(path, "rb") as f:
        head = f.read(qcow2.CLUSTER)
    try:
        return qcow2._parse_header(path, head, partial=False)
    except ValueError as exc:
        return str(exc)


def _split(path: Path) -> qcow2.Header | str:
    try:
        return qcow2.read_header(path)
    except ValueError as exc:
        return str(exc)


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=qcow2.MAX_BACKING_NAME)
extensions = st.lists(st.tuples(st.sampled_from([qcow2.EXT_BACKING_FORMAT, 0x6803F857, 7]), st.binary(max_size=3000)))


@settings(max_examples=150, deadline=None)
@given(
    name=names,
    name_at=st.one_of(st.just(0), st.integers(0, qcow2.CLUSTER + 64)),
    header_length=st.one_of(st.just(qcow2.HEADER_LENGTH), st.integers(0, 6000)),
    exts=extensions,
    length=st.one_of(st.just(None), st.integers(0, 3 * qcow2.CLUSTER)),
)
def test_a_split_read_parses_as_one_read_of_the_cluster(
    tmp_path_factory, name: str, name_at: int, header_length: int, exts: list[tuple[int, bytes]], length: int | None
) -> None:
    path = tmp_path_factory.mktemp("h") / "top.qcow2"
    qcow2.write_overlay(path, 1 << 30, name, sync=False)
    with open(path, "r+b") as f:
        head = bytearray(f.read(qcow2.CLUSTER))
        struct.pack_into(">I", head, 100, header_length)
        pos = max(header_length, 104)
        for ext_type, data in exts:
            block = struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
            head[pos : pos + len(block)] = block[: max(0, len(head) - pos)]
            pos += len(block)
        at = name_at or pos + 8
        if at + len(name) <= len(head):
            head[at : at + len(name)] = name.encode()
        struct.pack_into(">Q", head, 8, at)
        f.seek(0)
        f.write(head[: qcow2.CLUSTER])
    if length is not None:
        os.truncate(path, length)
    assert _split(path) == _whole(path)


def test_a_name_past_the_first_read_is_read(tmp_path: Path) -> None:
    path = tmp_path / "top.qcow2"
    qcow2.write_overlay(path, 1 << 30, "x" * 900, sync=False)
    with open(path, "r+b") as f:
        struct.pack_into(">Q", head := bytearray(f.read(4096)), 8, 5000)
        f.seek(0)
        f.write(head)
        f.seek(5000)
        f.write(b"../../layers/all/abcdef0123456789.qcow2".ljust(900, b"y"))
    assert qcow2.read_header(path).backing_file == "../../layers/all/abcdef0123456789.qcow2".ljust(900, "y")


def test_a_backing_name_that_is_a_fifo_does_not_hang_a_chain(tmp_path: Path) -> None:
    """A running box's QEMU writes its top's header: a name it gives is read by boxvm's chain
    walks (doctor, exports, templates), which must not wait on a FIFO for a writer."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    top = tmp_path / "top.qcow2"
    qcow2.write_overlay(top, 1 << 30, str(fifo), sync=False)
    done = threading.Event()

    def walk() -> None:
        with contextlib.suppress(OSError, ValueError):
            qcow2.chain(top)
        done.set()

    threading.Thread(target=walk, daemon=True).start()
    assert done.wait(5), "the chain walk waits on the FIFO"
