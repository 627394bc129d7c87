"""Warm starts (issue 15): a first start resumes from its machine's template instead of booting.

The template is made over REST (``POST /v1/templates``) for a machine no other test uses
(slim image, 320 MiB), so no other test's box resumes it. "Resumed, not booted" is
judged by the start's own record (a resume times its ``migrate-incoming``:
``resume_load_ms``) and by the time it took. The first test spends the template: QEMU
refuses its damaged state, the box boots cold instead and the template is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import boxvm
from boxvm import templates
from boxvm.engine import memory
from boxvm.errors import InvalidArgument, NotFound
from boxvm.options import BoxOptions, TemplateInfo
from boxvm.paths import Home
from tests.conftest import TOKEN, Server

# One worker runs the module: its template fixture on a second worker would make the
# template again and remove it at that worker's teardown, under the other's warm starts.
pytestmark = [pytest.mark.asyncio, pytest.mark.xdist_group("templates")]

MACHINE = BoxOptions(image="boxvm/slim", memory_mib=320)
RANDOM = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '"


async def sh(box: boxvm.Box, script: str) -> str:
    result = await box.exec(["sh", "-c", script])
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


@pytest_asyncio.fixture(scope="module")
async def template(home: Home, server: Server) -> AsyncIterator[TemplateInfo]:
    remote = boxvm.Runtime.remote(server.url, token=TOKEN)
    try:
        info = await remote.templates.create(MACHINE)  # the server boots it: the REST route
        assert (templates.root(home) / info.id / templates.INFO).is_file()
        assert info in await remote.templates.list()  # GET /v1/templates
        yield info
        if info.id in {t.id for t in await remote.templates.list()}:
            await remote.templates.remove(info.id)
    finally:
        await remote.close()


async def timed_start(rt: boxvm.Runtime, options: BoxOptions) -> tuple[boxvm.Box, float, list[str]]:
    """Create and start a box; seconds to its first exec, whether it resumed, its identity."""
    box = await rt.create(options, name=f"warm-{os.urandom(3).hex()}")
    t0 = time.monotonic()
    info = await box.start()
    out = await sh(box, f"hostname; cat /etc/machine-id; {RANDOM}")
    return box, time.monotonic() - t0, ["resume_load_ms" in info.timings, *out.split()]


async def test_warm_starts_resume_the_template_and_one_qemu_refuses_falls_back_to_a_cold_boot(
    rt: boxvm.Runtime, home: Home, template: TemplateInfo
) -> None:
    """Two warm starts resume the template. Then garbage goes into its device state, its
    record rewritten to vouch for it (every check before QEMU passes): QEMU's
    ``migrate-incoming`` fails, and the same ``start()`` boots the box cold (the cold time
    the warm ones are compared with) and removes the template. (Damage the checks see
    first is tests/unit/test_templates.py's; ``warm=False`` on a machine with a template is
    ``cold_box``'s, e.g. tests/vm/test_security_guest.py's console test.)"""
    assert template.memory_mib == 320 and template.id in {t.id for t in await rt.templates.list()}
    boxes = []
    try:
        a, warm_a, (resumed_a, host_a, mid_a, rnd_a) = await timed_start(rt, MACHINE)
        b, warm_b, (resumed_b, host_b, mid_b, rnd_b) = await timed_start(rt, MACHINE)
        boxes += [a, b]
        if not (resumed_a and resumed_b):
            timings = [(await box.info()).timings for box in (a, b)]
            pytest.fail(f"a first start booted instead of resuming the template: {timings}")
        assert (host_a, mid_a, host_b, mid_b) == (a.name, a.id, b.name, b.id), "not re-identified"
        assert rnd_a != rnd_b, "two warm starts read the same random bytes"
        assert (await a.exec(["true"])).exit_code == 0

        path = templates.root(home) / template.id
        garbage = os.urandom((path / memory.STATE).stat().st_size)
        (path / memory.STATE).write_bytes(garbage)
        meta = json.loads((path / memory.META).read_text())
        (path / memory.META).write_text(json.dumps({**meta, "state_sha256": hashlib.sha256(garbage).hexdigest()}))
        cold, cold_s, (resumed_c, host_c, _, _) = await timed_start(rt, MACHINE)
        boxes.append(cold)
        info = await cold.info()
        assert info.status == boxvm.BoxStatus.RUNNING and not resumed_c and host_c == cold.name
        assert "warm_fallback_ms" in info.timings, "the fallback is not visible in the box's timings"
        assert template.id not in {t.id for t in await rt.templates.list()} and not path.exists()
        with pytest.raises(NotFound):
            await rt.templates.remove(template.id)
        print(f"warm start {warm_a:.2f} s / {warm_b:.2f} s, failed resume + cold boot {cold_s:.2f} s"
              f" (the failed attempt {info.timings['warm_fallback_ms']:.0f} ms)")  # fmt: skip
        assert min(warm_a, warm_b) * 2 < cold_s, "the warm start was not faster than a cold boot"
    finally:
        for box in boxes:
            await rt.remove(box.id, force=True)


@pytest.mark.backends("local", "remote")
async def test_templates_are_listed_and_refused_alike_on_both_backends(
    rt: boxvm.Runtime, home: Home, template: TemplateInfo
) -> None:
    """(The template is spent by then: pytest runs the remote case after the local tests.)"""
    assert sorted(t.id for t in await rt.templates.list()) == sorted(t.id for t in templates.list_all(home))
    with pytest.raises(NotFound, match="no template"):
        await rt.templates.remove("0" * 16)
    for bad in ("../../etc", template.id.upper(), template.id + "0"):
        with pytest.raises(InvalidArgument, match="16 hex digits"):
            await rt.templates.remove(bad)
