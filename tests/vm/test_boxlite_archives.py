"""Archives exported by the real BoxLite 0.10.8 (``tests/data/boxlite/make.py`` made them):
they import and boot with their content. BoxLite's qcow2 writer leaves the COPIED flag unset,
which ``qemu-img check`` reports as errors although the image reads correctly."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

import boxvm

pytestmark = pytest.mark.backends("local", "remote")  # async tests run in asyncio mode "auto"
DATA = Path(__file__).resolve().parents[1] / "data" / "boxlite"


def test_the_kept_archives_really_have_the_copied_flag_problem(tmp_path: Path) -> None:
    """Positive evidence that these are the archives the import must repair."""
    names = []
    with (
        (DATA / "own-data.boxlite").open("rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as src,
        tarfile.open(fileobj=src, mode="r|") as tar,
    ):
        for member in tar:
            names.append(member.name)
            if member.name == "disk.qcow2":
                with (tmp_path / "disk.qcow2").open("wb") as out:
                    shutil.copyfileobj(tar.extractfile(member), out)  # type: ignore[arg-type]
    assert names == ["manifest.json", "disk.qcow2"]
    check = subprocess.run(["qemu-img", "check", str(tmp_path / "disk.qcow2")], capture_output=True, text=True)
    assert check.returncode != 0 and "ERROR OFLAG_COPIED" in check.stderr


@pytest.mark.parametrize(
    ("archive", "expected"),
    [
        ("image-data.boxlite", {"/data/in-image.txt": b"in-the-image\n"}),
        ("own-data.boxlite", {"/data/in-image.txt": b"in-the-image\n", "/data/own.txt": b"in-the-box-disk\n"}),
    ],
)
async def test_real_boxlite_archive_imports_and_boots(
    rt: boxvm.Runtime, tmp_path: Path, archive: str, expected: dict[str, bytes]
) -> None:
    name = f"t-real-{archive.split('.')[0]}-{tmp_path.name[-6:]}"
    box = await rt.import_box(DATA / archive, name=name)
    try:
        info = await box.info()
        assert info.disk_bytes > 0
        await box.start()
        for path, content in expected.items():
            r = await box.exec(["cat", path])
            assert (r.exit_code, r.stdout) == (0, content), r.stderr
        if "/data/own.txt" not in expected:
            assert (await box.exec(["cat", "/data/own.txt"])).exit_code != 0
        r = await box.exec(["sh", "-c", "echo more > /data/new && cat /data/new"])
        assert r.stdout == b"more\n"  # the repaired disk takes writes
    finally:
        await rt.remove(box.id, force=True)
