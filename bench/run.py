"""``make bench``: medians for the box lifecycle, with a baseline measured in the same run.

Baseline: a bare ``qemu-system-x86_64`` with the same machine type, kernel and
acceleration booting a minimal initramfs whose init prints a marker and powers off,
i.e. the floor any VM runtime on this host pays before its own code runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import boxvm
from bench import targets
from boxvm.build.cpio import write_cpio
from boxvm.engine import accel as accel_mod
from boxvm.engine import hostclock, qemu
from boxvm.guest import bundle
from boxvm.images.default import ensure_default
from boxvm.paths import Home

REPO = Path(__file__).resolve().parent.parent
MARKER = b"BOXVM-BASELINE-INIT"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def baseline_initramfs(b: bundle.Bundle, work: Path) -> Path:
    """An initramfs with the real one's busybox and an init that only prints a marker."""
    root = work / "baseline-initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "init").write_text(f"#!/bin/busybox sh\n/bin/busybox echo {MARKER.decode()}\n/bin/busybox reboot -f\n")
    (root / "init").chmod(0o755)
    (root / "bin" / "busybox").write_bytes(_busybox_from(b.initramfs))
    (root / "bin" / "busybox").chmod(0o755)
    cpio = work / "baseline.cpio"
    with cpio.open("wb") as out:
        write_cpio(root, out)
    return cpio


def bare_boot_to_init(b: bundle.Bundle, cpio: Path, acc: accel_mod.Accel) -> float:
    """Seconds from QEMU spawn to the first line the initramfs's init prints."""
    cmdline = "console=ttyS0 reboot=t panic=-1 quiet loglevel=3"
    if acc.name == "tcg":
        cmdline += f" tsc_early_khz={hostclock.tsc_khz(None)}"
    argv = [
        qemu.qemu_binary(), "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", acc.name,
        "-cpu", "host" if acc.name == "kvm" else "max", "-m", "512", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-kernel", str(b.kernel), "-initrd", str(cpio),
        "-append", cmdline, "-serial", "stdio",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    while MARKER not in seen:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            raise RuntimeError("baseline guest exited before init ran")
        seen += chunk
    elapsed = time.perf_counter() - t0
    proc.wait(timeout=30)
    return elapsed


def _busybox_from(cpio: Path) -> bytes:
    """Pull bin/busybox out of our newc initramfs (the format write_cpio produces)."""
    data = cpio.read_bytes()
    pos = 0
    while pos < len(data):
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        body = name_end + (-(110 + namesize) % 4)
        if name == "bin/busybox":
            return data[body : body + size]
        pos = body + size + (-size % 4)
    raise RuntimeError("no bin/busybox in the initramfs")


async def lifecycle(home: Home, runs: int, exec_runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"cold_start": [], "create": [], "start": [], "first_exec": [], "stop": []}
    results["warm_exec"] = []
    async with boxvm.Runtime(home.root) as rt:
        for i in range(runs):
            name = f"bench-{i}"
            if await rt.get(name):
                await rt.remove(name, force=True)
            t0 = time.perf_counter()
            box = await rt.create(name=name)
            t1 = time.perf_counter()
            await box.start()
            t2 = time.perf_counter()
            r = await box.exec(["echo", "hi"])
            t3 = time.perf_counter()
            assert r.stdout == b"hi\n"
            results["create"].append(ms(t1 - t0))
            results["start"].append(ms(t2 - t1))
            results["first_exec"].append(ms(t3 - t2))
            results["cold_start"].append(ms(t3 - t0))
            if i == 0:
                for _ in range(exec_runs):
                    t = time.perf_counter()
                    await box.exec(["true"])
                    results["warm_exec"].append(ms(time.perf_counter() - t))
            t = time.perf_counter()
            await box.stop()
            results["stop"].append(ms(time.perf_counter() - t))
            await rt.remove(box.id)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--exec-runs", type=int, default=50)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "last-run.json")
    groups = ["lifecycle", "state", "compare", "archive", "rest", "registry", "image", "memory", "memxfer", "s3"]
    parser.add_argument("--only", choices=groups, help="Run one group.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="Run nothing: check --json against BENCHMARKS.md's targets, exit 1 on a miss.",
    )
    args = parser.parse_args()
    if args.check:
        sys.exit(check(args.json))
    home = Home.default(os.environ.get("BOXVM_BENCH_HOME", REPO / ".bench-home"))
    b = bundle.ensure(home, print)
    ensure_default(home, print)
    acc = accel_mod.detect()
    results: dict[str, list[float]] = {}
    if args.only in (None, "lifecycle"):
        with home.staging("bench-") as work:
            cpio = baseline_initramfs(b, work)
            baseline = [ms(bare_boot_to_init(b, cpio, acc)) for _ in range(args.runs)]
        results.update(asyncio.run(lifecycle(home, args.runs, args.exec_runs)))
        results["bare_qemu_boot_to_init"] = baseline
    if args.only in (None, "state"):
        from bench.state import run_state

        results.update(asyncio.run(run_state(home, args.runs)))
    if args.only in (None, "compare"):
        from bench.compare import run_compare

        results.update(asyncio.run(run_compare(home, max(args.runs, 9))))
    if args.only in (None, "archive"):
        from bench.archive import run_archive

        results.update(asyncio.run(run_archive(home.root, max(3, args.runs // 2))))
    if args.only in (None, "rest"):
        from bench.rest import run_rest

        results.update(asyncio.run(run_rest(home, max(3, args.runs // 2))))
    if args.only in (None, "registry"):
        from bench.registry import run_registry

        results.update(asyncio.run(run_registry(args.runs)))
    if args.only in (None, "image"):
        from bench.image import run_image

        results.update(asyncio.run(run_image(home, args.runs)))
    if args.only in (None, "memory"):
        from bench.memory import run_memory

        results.update(asyncio.run(run_memory(home, max(3, args.runs // 2))))
    if args.only in (None, "memxfer"):
        from bench.memory_transfer import run_memory_transfer

        results.update(asyncio.run(run_memory_transfer(home, max(3, args.runs // 2))))
    if args.only in (None, "s3"):
        from bench.s3 import run_s3

        results.update(asyncio.run(run_s3(home, max(3, args.runs // 2))))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, {acc.name}; runs={args.runs}")
    print(f"{'benchmark':<28}{'median ms':>12}{'min':>10}{'max':>10}")
    for key, values in results.items():
        print(f"{key:<28}{med[key]:>12.1f}{min(values):>10.1f}{max(values):>10.1f}")
    ratios = {}
    if "cold_start" in med:
        ratios["cold_start / bare_qemu_boot_to_init"] = med["cold_start"] / med["bare_qemu_boot_to_init"]
    if "overlay_write_inprocess" in med:
        ratios["overlay_write_inprocess / overlay_write_qemu_img"] = (
            med["overlay_write_inprocess"] / med["overlay_write_qemu_img"]
        )
        ratios["snapshot_create_2g / snapshot_create_64m"] = med["snapshot_create_2g"] / med["snapshot_create_64m"]
        ratios["clone_2g / clone_64m"] = med["clone_2g"] / med["clone_64m"]
    if "boxvm_clone" in med:
        from bench.compare import ratios as compare_ratios

        ratios.update(compare_ratios(med))
    if "export_mb_s" in med:
        ratios["export_mb_s / export_baseline_mb_s"] = med["export_mb_s"] / med["export_baseline_mb_s"]
        ratios["import_mb_s / import_baseline_mb_s"] = med["import_mb_s"] / med["import_baseline_mb_s"]
    if "export_rest" in med:
        ratios["export_rest / export_local"] = med["export_rest"] / med["export_local"]
        ratios["import_rest / import_local"] = med["import_rest"] / med["import_local"]
    if "pull_cold" in med:
        ratios["pull_cold / skopeo_copy_baseline"] = med["pull_cold"] / med["skopeo_copy_baseline"]
        ratios["pull_cached / skopeo_copy_baseline"] = med["pull_cached"] / med["skopeo_copy_baseline"]
    print()
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}")
    args.json.write_text(
        json.dumps(
            {"accel": acc.name, "only": args.only, "medians_ms": med, "ratios": ratios, "samples_ms": results},
            indent=2,
        )
    )
    misses, _ = targets.report(targets.check(targets.load(REPO / "BENCHMARKS.md"), med))
    print(*(misses or ["every target this run measured is met"]), sep="\n")


def check(path: Path) -> int:
    """0 when every target the run at ``path`` measured is met; 1 (each miss listed) otherwise.

    After a full run (no ``--only``) a target it did not measure fails too: its key is misspelt
    in BENCHMARKS.md or the bench no longer produces it.
    """
    if not path.exists():
        print(f"bench --check: no {path}; run `make bench` (or `python -m bench --only GROUP`) first", file=sys.stderr)
        return 2
    run = json.loads(path.read_text())
    medians = run.get("medians_ms") if isinstance(run, dict) else None
    if not isinstance(medians, dict):
        print(f"bench --check: {path} has no medians_ms; run `make bench` again", file=sys.stderr)
        return 2
    outcomes = targets.check(targets.load(REPO / "BENCHMARKS.md"), medians)
    misses, unmeasured = targets.report(outcomes)
    full_run = "only" in run and run["only"] is None
    for line in unmeasured:
        print(line, file=sys.stderr if full_run else sys.stdout)
    for line in misses:
        print(line, file=sys.stderr)
    met = sum(o.met for o in outcomes)
    print(f"bench --check: {met} met, {len(misses)} missed, {len(unmeasured)} not measured in {path.name}")
    return 1 if misses or (full_run and unmeasured) else 0


if __name__ == "__main__":
    main()
