"""Bad input gets a clear error of the right class and changes nothing."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

import boxvm
from boxvm.paths import Home
from tests.helpers import leftovers

pytestmark = pytest.mark.asyncio


async def test_unknown_box(rt: boxvm.Runtime) -> None:
    assert await rt.get("no-such-box") is None
    with pytest.raises(boxvm.NotFound, match="no-such-box"):
        await rt.remove("no-such-box")


@pytest.mark.parametrize("name", ["", "..", "a/b", "x" * 129, ".hidden", "-dash", "sp ace", "nul\0"])
async def test_bad_names_are_refused(rt: boxvm.Runtime, name: str) -> None:
    before = {i.id for i in await rt.list()}
    with pytest.raises(boxvm.InvalidArgument, match="invalid box name"):
        await rt.create(name=name)
    assert {i.id for i in await rt.list()} == before


async def test_longest_name_is_accepted(rt: boxvm.Runtime) -> None:
    box = await rt.create(name="n" * 128)
    await rt.remove(box.id)


async def test_duplicate_name(rt: boxvm.Runtime, fresh_box: boxvm.Box) -> None:
    with pytest.raises(boxvm.AlreadyExists, match=fresh_box.name):
        await rt.create(name=fresh_box.name)


@pytest.mark.parametrize(
    "options, message",
    [
        (boxvm.BoxOptions(cpus=0), "cpus"),
        (boxvm.BoxOptions(memory_mib=16), "memory_mib"),
        (boxvm.BoxOptions(network="bridge"), "network"),
        (boxvm.BoxOptions(ports=[(0, 80)]), "port"),
        (boxvm.BoxOptions(network="none", ports=[(8080, 80)]), "ports need"),
        (boxvm.BoxOptions(env={"A=B": "x"}), "environment"),
    ],
)
async def test_bad_options(rt: boxvm.Runtime, options: boxvm.BoxOptions, message: str) -> None:
    with pytest.raises(boxvm.InvalidArgument, match=message):
        await rt.create(options)


async def test_bad_image_paths(rt: boxvm.Runtime, home: Home, tmp_path: Path) -> None:
    with pytest.raises(boxvm.ImageError, match="not found"):
        await rt.create(boxvm.BoxOptions(image=str(tmp_path / "missing")))
    with pytest.raises(boxvm.ImageError, match="not an OCI image layout"):
        await rt.create(boxvm.BoxOptions(image=str(tmp_path)))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(boxvm.ImageError, match="not a readable OCI archive"):
        await rt.create(boxvm.BoxOptions(image=str(junk)))
    with pytest.raises(boxvm.ImageError, match=r"cannot reach registry 127\.0\.0\.1:1"):
        await rt.create(boxvm.BoxOptions(image="127.0.0.1:1/nobody/here:v1"))
    assert leftovers(home, [os.getpid()]) == []


async def test_exec_on_a_stopped_box(fresh_box: boxvm.Box) -> None:
    with pytest.raises(boxvm.InvalidState, match=r"cannot exec box '.*' while it is configured: start it first"):
        await fresh_box.exec(["true"])
    with pytest.raises(boxvm.InvalidState, match="while it is configured"):
        await fresh_box.stop()
    with pytest.raises(boxvm.InvalidState):
        await fresh_box.copy_in("/etc/hostname", "/root/")


async def test_argv_validation(shared_box: boxvm.Box) -> None:
    with pytest.raises(boxvm.InvalidArgument, match="NUL"):
        await shared_box.exec(["echo", "a\0b"])
    with pytest.raises(boxvm.InvalidArgument, match="non-empty list"):
        await shared_box.exec([])
    with pytest.raises(boxvm.InvalidArgument, match="non-empty list"):
        await shared_box.exec("echo hi")  # type: ignore[arg-type]
    with pytest.raises(boxvm.InvalidArgument, match="environment"):
        await shared_box.exec(["true"], env={"BAD\0": "x"})
    with pytest.raises(boxvm.InvalidArgument, match="timeout"):
        await shared_box.exec(["true"], timeout=0)
    assert (await shared_box.exec(["echo", "still fine"])).stdout == b"still fine\n"


async def test_start_twice_is_invalid_state(shared_box: boxvm.Box) -> None:
    with pytest.raises(boxvm.InvalidState, match="already running"):
        await shared_box.start()


async def test_unsafe_image_layers_are_refused(rt: boxvm.Runtime, tmp_path: Path) -> None:
    """A layer that escapes the root through '..' is refused before anything is written outside."""
    import io

    from boxvm.images import oci

    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("../../escaped")
        data = b"owned"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layout = tmp_path / "evil"
    oci.write_layout(layer, layout, {"architecture": "amd64", "os": "linux", "config": {}}, "evil")
    with pytest.raises(boxvm.ImageError, match="escapes the image root"):
        await rt.create(boxvm.BoxOptions(image=str(layout)))
    assert not (rt.backend.home.root / "escaped").exists()  # type: ignore[attr-defined]
