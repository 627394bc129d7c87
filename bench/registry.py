"""Pull of a ~100 MB multi-layer image from a local registry (Debian's docker-registry on
127.0.0.1), cold (empty cache) and cached, against ``skopeo copy`` of the same image to a
directory as the baseline, in the same run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import boxvm
from boxvm.paths import Home
from tests.registry import RegistryServer, layer, push_image


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


async def run_registry(runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"pull_cold": [], "pull_cached": [], "skopeo_copy_baseline": []}
    with tempfile.TemporaryDirectory(prefix="boxvm-bench-registry-") as tmp:
        root = Path(tmp)
        server = RegistryServer(root / "registry").start()
        try:
            # 4 layers of 36 MB: 24 MB random (incompressible), 12 MB of text
            text = (Path("/usr/share/common-licenses/GPL-3").read_bytes() * 800)[: 12 << 20]
            layers = [layer({f"l{i}/random": os.urandom(24 << 20), f"l{i}/text": text}) for i in range(4)]
            with server.client() as http:
                push_image(http, "bench/app", "v1", None, layers)
            size = sum(len(b) for b, _ in layers) / 1e6
            print(f"bench-registry: image of {size:.0f} MB in 4 layers")
            ref = f"{server.host}/bench/app:v1"
            for i in range(runs):
                home = Home.default(root / f"home-{i}")
                async with boxvm.Runtime(home.root) as rt:
                    t0 = time.perf_counter()
                    await rt.images.pull(ref)
                    results["pull_cold"].append(_ms(t0))
                    t0 = time.perf_counter()
                    await rt.images.pull(ref)
                    results["pull_cached"].append(_ms(t0))
                shutil.rmtree(home.root)
                dest = root / f"skopeo-{i}"
                t0 = time.perf_counter()
                subprocess.run(
                    ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{dest}"],
                    check=True,
                    capture_output=True,
                )
                results["skopeo_copy_baseline"].append(_ms(t0))
                shutil.rmtree(dest)
        finally:
            server.stop()
    return results


if __name__ == "__main__":
    print(asyncio.run(run_registry(3)))
