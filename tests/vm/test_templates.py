"""Warm starts (issue 15): a first start resumes from its machine's template instead of booting.

The template is made for a machine no other test uses (slim image, 320 MiB), so boxes of
other tests keep booting cold. "Resumed, not booted" is judged by the start's own
record (a resume times its ``migrate-incoming``: ``resume_load_ms``) and by the time it took.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import boxvm
from boxvm.errors import NotFound
from boxvm.options import BoxOptions
from boxvm.templates import TemplateInfo

pytestmark = [pytest.mark.asyncio]

MACHINE = BoxOptions(image="boxvm/slim", memory_mib=320)
RANDOM = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '"


async def sh(box: boxvm.Box, script: str) -> str:
    result = await box.exec(["sh", "-c", script])
    assert result.exit_code == 0, result
    return result.stdout.decode().strip()


@pytest_asyncio.fixture(scope="module")
async def template(rt: boxvm.Runtime) -> AsyncIterator[TemplateInfo]:
    info = await rt.templates.create(MACHINE)
    yield info
    if info.id in {t.id for t in await rt.templates.list()}:
        await rt.templates.remove(info.id)


async def timed_start(rt: boxvm.Runtime, options: BoxOptions) -> tuple[boxvm.Box, float, list[str]]:
    """Create and start a box; seconds to its first exec, whether it resumed, its identity."""
    box = await rt.create(options, name=f"warm-{os.urandom(3).hex()}")
    t0 = time.monotonic()
    info = await box.start()
    out = await sh(box, f"hostname; cat /etc/machine-id; {RANDOM}")
    return box, time.monotonic() - t0, ["resume_load_ms" in info.timings, *out.split()]


async def test_warm_start_resumes_the_template_and_warm_false_boots(rt: boxvm.Runtime, template: TemplateInfo) -> None:
    assert template.memory_mib == 320 and template.id in {t.id for t in await rt.templates.list()}
    boxes = []
    try:
        a, warm_a, (resumed_a, host_a, mid_a, rnd_a) = await timed_start(rt, MACHINE)
        b, warm_b, (resumed_b, host_b, mid_b, rnd_b) = await timed_start(rt, MACHINE)
        boxes += [a, b]
        assert resumed_a and resumed_b, "a first start booted instead of resuming the template"
        assert (host_a, mid_a, host_b, mid_b) == (a.name, a.id, b.name, b.id), "not re-identified"
        assert rnd_a != rnd_b, "two warm starts read the same random bytes"
        assert (await a.exec(["true"])).exit_code == 0
        cold, cold_s, (resumed_c, host_c, _, _) = await timed_start(
            rt, BoxOptions(**{**MACHINE.to_dict(), "warm": False})
        )
        boxes.append(cold)
        assert not resumed_c and host_c == cold.name, "warm=False resumed the template"
        print(f"warm start {warm_a:.2f} s / {warm_b:.2f} s, cold {cold_s:.2f} s")
        assert min(warm_a, warm_b) * 2 < cold_s, "the warm start was not faster than a cold boot"
    finally:
        for box in boxes:
            await rt.remove(box.id, force=True)


async def test_removed_template_is_not_used(rt: boxvm.Runtime, template: TemplateInfo) -> None:
    await rt.templates.remove(template.id)
    assert template.id not in {t.id for t in await rt.templates.list()}
    with pytest.raises(NotFound):
        await rt.templates.remove(template.id)
    with pytest.raises(NotFound):
        await rt.templates.remove("../../etc")
