"""The built-in images side by side: cold start (create + start + first exec) of a box from
``boxvm/default`` (Debian, mmdebstrap) and from ``boxvm/slim`` (busybox), alternated in the
same run so both see the same host load; plus each image's recorded build time and size.

The first exec runs ``python3 -c`` because that is what a sandbox's first command usually is
and it reads the most of the image. Each image's base disk is built before timing (a one-time
cost per image and disk size, reported as ``base_disk_*``).
"""

from __future__ import annotations

import time

import boxvm
from boxvm.images.default import DEFAULT_REF, SLIM_REF, ensure_default, ensure_slim, info
from boxvm.paths import Home

FIRST = ["python3", "-c", "import sys; print(sys.version_info[0])"]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def run_image(home: Home, runs: int) -> dict[str, list[float]]:
    layouts = {"default": ensure_default(home, print), "slim": ensure_slim(home, print)}
    results: dict[str, list[float]] = {}
    for key, layout in layouts.items():
        built = info(layout)
        size, seconds = built.get("layer_bytes", 0) / 1e6, built.get("build_seconds", 0)
        count = len(built.get("packages", []))
        print(f"bench-image: {key}: {size:.0f} MB layer, {count} packages, built in {seconds} s")
        results[f"image_build_{key}_s"] = [float(built.get("build_seconds", 0))]
        results[f"image_layer_{key}_mb"] = [round(built.get("layer_bytes", 0) / 1e6, 1)]
    refs = {"default": DEFAULT_REF, "slim": SLIM_REF}
    async with boxvm.Runtime(home.root) as rt:
        for key, ref in refs.items():  # the base disk, once per image, outside the timings
            t0 = time.perf_counter()
            box = await rt.create(boxvm.BoxOptions(image=ref), name=f"bench-image-warm-{key}")
            results[f"base_disk_{key}"] = [_ms(time.perf_counter() - t0)]
            await rt.remove(box.id)
        for i in range(runs):
            for key, ref in refs.items():
                name = f"bench-image-{key}-{i}"
                if await rt.get(name):
                    await rt.remove(name, force=True)
                t0 = time.perf_counter()
                box = await rt.create(boxvm.BoxOptions(image=ref), name=name)
                await box.start()
                t1 = time.perf_counter()
                r = await box.exec(FIRST)
                t2 = time.perf_counter()
                assert r.exit_code == 0 and r.stdout == b"3\n", r
                results.setdefault(f"cold_start_{key}", []).append(_ms(t2 - t0))
                results.setdefault(f"first_python_exec_{key}", []).append(_ms(t2 - t1))
                await rt.remove(box.id, force=True)
    return results
