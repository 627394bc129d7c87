"""boxvm against BoxLite 0.10.8, side by side in one run, and boxvm at 1, 100 and 1000
boxes in the home (``--only compare``).

BoxLite is pip-installed into a scratch venv under the bench home (``BOXLITE_PYTHON``
names an interpreter that has it instead) and driven in a subprocess
(``bench/boxlite_driver.py``). Both use the same OCI layout (boxvm's default image) and
the same ``.boxlite`` archive (exported by BoxLite) for import; rounds alternate between
the two. On hosts without hardware virtualization BoxLite's ``start()`` fails after its
disk is made; only host-side operations on stopped boxes are timed, for both.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import boxvm
from bench.archive import baseline_export, baseline_import
from boxvm.disks.layers import TOP
from boxvm.images.default import ensure_default
from boxvm.paths import Home

BOXLITE = "boxlite==0.10.8"
OPS = ["snapshot_create", "snapshot_restore", "snapshot_remove", "clone", "remove"]
SCALES = (1, 100, 1000)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def boxlite_python(home: Home) -> str:
    """An interpreter with BoxLite, installed into a scratch venv on first use."""
    if os.environ.get("BOXLITE_PYTHON"):
        return os.environ["BOXLITE_PYTHON"]
    venv = home.root / "boxlite-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('boxlite'))"]
    if not python.exists() or subprocess.run(probe, capture_output=True, text=True).stdout.strip() != "0.10.8":
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", BOXLITE], check=True)
    return str(python)


class BoxLite:
    def __init__(self, python: str, home: Path, layout: Path) -> None:
        driver = Path(__file__).with_name("boxlite_driver.py")
        self.proc = subprocess.Popen(
            [python, str(driver), str(home), str(layout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, *words: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the BoxLite driver exited; see its output above")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


async def boxvm_round(rt: boxvm.Runtime, box: boxvm.Box, n: int, archive: Path | None) -> dict[str, float]:
    """The same sequence as the driver's ``round``."""
    out = {}
    t = time.perf_counter()
    await box.snapshot.create(f"s{n}")
    out["snapshot_create"] = ms(time.perf_counter() - t)
    t = time.perf_counter()
    await box.snapshot.restore(f"s{n}")
    out["snapshot_restore"] = ms(time.perf_counter() - t)
    t = time.perf_counter()
    clone = await box.clone(f"bench-cmp-c{n}")
    out["clone"] = ms(time.perf_counter() - t)
    t = time.perf_counter()
    await rt.remove(clone.id)
    out["remove"] = ms(time.perf_counter() - t)
    await box.snapshot.create(f"r{n}")
    await box.snapshot.restore("base")
    t = time.perf_counter()
    await box.snapshot.remove(f"r{n}")
    out["snapshot_remove"] = ms(time.perf_counter() - t)
    if archive is not None:
        t = time.perf_counter()
        imported = await rt.import_box(archive, name=f"bench-cmp-i{n}")
        out["import"] = ms(time.perf_counter() - t)
        await rt.remove(imported.id)
        dest = archive.with_name("boxvm-export.tar.zst")
        t = time.perf_counter()
        await box.export(dest)
        out["export"] = ms(time.perf_counter() - t)
        dest.unlink()
    # Deletions run in the background, after the call returns; let them finish here, untimed,
    # so they do not land in BoxLite's next round.
    await asyncio.to_thread(rt.backend.layers.trash.flush)  # type: ignore[attr-defined]
    return out


async def run_compare(home: Home, runs: int, import_runs: int = 3) -> dict[str, list[float]]:
    layout = ensure_default(home, print)
    work = home.staging_dir("bench-compare-")
    archive = work / "subject.boxlite"
    results: dict[str, list[float]] = {}

    def add(prefix: str, sample: dict[str, float]) -> None:
        for key, value in sample.items():
            results.setdefault(f"{prefix}{key}", []).append(value)

    boxlite = BoxLite(boxlite_python(home), work / "boxlite-home", layout)
    try:
        boxlite.ask("setup", str(archive))
        async with boxvm.Runtime(home.root) as rt:
            for stale in await rt.list():
                if stale.name.startswith("bench-cmp"):
                    await rt.remove(stale.id, force=True)
            box = await rt.create(boxvm.BoxOptions(image=str(layout), disk_size_gb=1), name="bench-cmp")
            await box.snapshot.create("base")
            try:
                for i in range(max(runs, import_runs)):  # interleaved: BoxLite, then boxvm, each round
                    with_import = [str(archive), str(work / "boxlite-export")] if i < import_runs else []
                    theirs = boxlite.ask("round", *with_import)
                    ours = await boxvm_round(rt, box, i, archive if with_import else None)
                    add("boxlite_", theirs)
                    add("boxvm_", ours)
                    load = os.getloadavg()[0]
                    results.setdefault("load_1m", []).append(load)
                    print(
                        f"compare round {i}: load {load:.1f}",
                        {k: f"{ours[k] / theirs[k]:.2f}x" for k in ours if theirs.get(k)},
                    )
                    if with_import:
                        results.setdefault("import_baseline", []).append(ms(baseline_import(archive, work)))
                        top = home.box_dir(box.id) / TOP  # the same data, read through its chain
                        results.setdefault("export_baseline", []).append(ms(baseline_export(top)))
                        for p in work.glob("baseline-*"):
                            p.unlink()
                for scale in SCALES:  # boxvm with this many boxes in the home
                    count = len(await rt.list())
                    if scale > count:
                        await box.clone_many(scale - count, boxvm.CloneOptions(from_snapshot="base"))
                        # The rows measure a home of this size, not the kernel writing back the
                        # ~2 files per clone the filling just made (it did, 30 s later, inside them).
                        await asyncio.to_thread(os.sync)
                    for i in range(runs):
                        add(f"boxvm_{scale}boxes_", await boxvm_round(rt, box, 1000 * scale + i, None))
                    print(f"compare at {scale} boxes: load {os.getloadavg()[0]:.1f}")
            finally:
                for info in await rt.list():
                    if info.name.startswith("bench-cmp"):
                        await rt.remove(info.id, force=True)
    finally:
        boxlite.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return results


def ratios(med: dict[str, float]) -> dict[str, float]:
    out = {}
    for op in [*OPS, "import", "export"]:
        if f"boxvm_{op}" in med and f"boxlite_{op}" in med:
            out[f"boxvm_{op} / boxlite_{op}"] = med[f"boxvm_{op}"] / med[f"boxlite_{op}"]
    if "boxvm_import" in med and "import_baseline" in med:
        out["import_baseline / boxvm_import (throughput vs baseline)"] = med["import_baseline"] / med["boxvm_import"]
    if "boxvm_export" in med and "export_baseline" in med:
        out["export_baseline / boxvm_export (throughput vs baseline)"] = med["export_baseline"] / med["boxvm_export"]
    for op in OPS:
        first, last = f"boxvm_{SCALES[0]}boxes_{op}", f"boxvm_{SCALES[-1]}boxes_{op}"
        if first in med and last in med:
            out[f"{last} / {first}"] = med[last] / med[first]
    return out


def medians(results: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in results.items()}
