"""The built-in images as a newcomer meets them: the commands people type first in a sandbox,
each result checked, in one box of the default (Debian) image and one of the slim image."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import boxvm

pytestmark = pytest.mark.asyncio


async def _box(rt: boxvm.Runtime, image: str | None, label: str) -> AsyncIterator[boxvm.Box]:
    box = await rt.create(boxvm.BoxOptions(image=image), name=f"img-{label}-{os.urandom(2).hex()}")
    await box.start()
    yield box
    await rt.remove(box.id, force=True)


@pytest_asyncio.fixture(scope="module")
async def debian_box(rt: boxvm.Runtime) -> AsyncIterator[boxvm.Box]:
    async for box in _box(rt, None, "default"):
        yield box


@pytest_asyncio.fixture(scope="module")
async def slim_box(rt: boxvm.Runtime) -> AsyncIterator[boxvm.Box]:
    async for box in _box(rt, "boxvm/slim", "slim"):
        yield box


async def sh(box: boxvm.Box, script: str, **kw: object) -> str:
    r = await box.exec(["sh", "-c", script], **kw)  # type: ignore[arg-type]
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


async def test_nohup_background_process_survives(debian_box: boxvm.Box) -> None:
    await sh(debian_box, "nohup sleep 30 >/dev/null 2>&1 &")
    assert "sleep 30" in await sh(debian_box, "ps -eo args")


async def test_python_full_stdlib_venv_and_pip(debian_box: boxvm.Box) -> None:
    await sh(debian_box, "python3 -c 'import sqlite3, ssl, venv, ctypes, zlib, bz2, lzma, readline, ensurepip'")
    # A venv and pip, without ensurepip unpacking pip into the venv (over 2 min under TCG; the
    # ensurepip module's presence is checked above).
    venv = "python3 -m venv --without-pip /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.prefix)'"
    assert (await sh(debian_box, venv, timeout=120)).strip() == "/tmp/v"
    assert (await sh(debian_box, "python3 -m pip --version", timeout=120)).startswith("pip ")


async def test_git_curl_os_release_certs(debian_box: boxvm.Box) -> None:
    out = await sh(
        debian_box,
        "cd /tmp && git init -q repo && cd repo && git -c user.name=n -c user.email=n@e commit -q --allow-empty -m x"
        " && git log --format=%s",
    )
    assert out == "x\n"
    assert (await sh(debian_box, "curl --version")).startswith("curl ")
    assert "ID=debian" in (release := await sh(debian_box, "cat /etc/os-release")) and "bookworm" in release
    certs = await sh(debian_box, "ls -la /etc/ssl/certs | head")
    assert ".pem" in certs and len(certs.splitlines()) == 10


async def test_locale_tput_user_and_clock(debian_box: boxvm.Box) -> None:
    assert "LANG=C.UTF-8" in await sh(debian_box, "locale")
    assert "C.utf8" in await sh(debian_box, "locale -a")
    proc = await debian_box.spawn(["sh", "-c", "tput cols"], tty=True, size=(30, 97))
    out = b"".join([c async for c in proc.stdout])
    assert await proc.wait() == 0 and out.strip() == b"97"
    assert (await sh(debian_box, "id user")).startswith("uid=1000(user) gid=1000(user)")
    out = (await sh(debian_box, "id -un; echo $HOME; touch ~/f && ls -n ~/f", user="user")).split("\n")
    assert out[:2] == ["user", "/home/user"] and out[2].split()[2:4] == ["1000", "1000"]
    guest = float(await sh(debian_box, "date +%s.%N"))
    assert abs(guest - time.time()) < 1.0


async def test_slim_has_nohup_and_sqlite(slim_box: boxvm.Box) -> None:
    await sh(slim_box, "nohup sleep 30 >/dev/null 2>&1 &")
    assert "sleep 30" in await sh(slim_box, "ps")
    await sh(slim_box, 'python3 -c \'import sqlite3; sqlite3.connect(":memory:").execute("select 1")\'')
