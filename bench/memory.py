"""Memory-state benchmarks (issue 15) at 512 MiB and 2 GiB guests: suspend, resume to the
first exec (against a cold start to the first exec in the same run), and the guest pause of a
memory snapshot of a running box (a pre-copy while it runs where the kernel tracks soft-dirty
pages), and the memory snapshot of the suspended box (against the running one's); plus what
is saved (device state, RAM data) and the RSS of a resumed QEMU.

Forks and warm starts: a warm start (a first start resumed from the machine's template) to
the first exec; 10 forks of one memory snapshot to all running; each fork's host memory
(RSS, and USS: the pages only it holds) against the guest's used memory; and, as the
baseline, QEMU's own ``migrate-incoming`` of the same state with the RAM in the stream (a
fork's own suspend saves it so): its resume to the first exec and its RSS.

Warm-started boxes (private RAM, saved in the migration stream): the memory snapshot guest
pause with QEMU's live pre-copy, against the stop-and-copy it replaced, interleaved in the
same run; and the time a suspend keeps the guest stopped, each way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import psutil

import boxvm
from boxvm.engine import memory, memory_precopy
from boxvm.paths import Home


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _first_exec(box: boxvm.Box) -> None:
    result = await box.exec(["true"])
    assert result.exit_code == 0, result


async def one_size(rt: boxvm.Runtime, home: Home, mib: int, runs: int) -> dict[str, list[float]]:
    label = "2g" if mib >= 2048 else f"{mib}m"
    out: dict[str, list[float]] = {
        f"cold_start_to_exec_{label}": [],
        f"suspend_{label}": [],
        f"resume_to_exec_{label}": [],
        f"resume_to_exec_direct_supervisor_{label}": [],
        f"memory_snapshot_pause_{label}": [],
        f"memory_snapshot_{label}": [],
        f"memory_snapshot_suspended_{label}": [],
    }
    sizes: dict[str, list[float]] = {f"device_state_kib_{label}": [], f"ram_data_mib_{label}": []}
    sizes[f"resumed_qemu_rss_mib_{label}"] = []
    box = await rt.create(boxvm.BoxOptions(memory_mib=mib, warm=False), name=f"bench-memory-{label}-{os.getpid()}")
    box_dir = home.box_dir(box.id)
    try:
        t = time.perf_counter()
        await box.start()
        await _first_exec(box)
        out[f"cold_start_to_exec_{label}"].append(ms(time.perf_counter() - t))
        for i in range(runs):
            t = time.perf_counter()
            snap = await box.snapshot.create(f"m{i}", boxvm.SnapshotOptions(memory=True))
            out[f"memory_snapshot_{label}"].append(ms(time.perf_counter() - t))
            out[f"memory_snapshot_pause_{label}"].append(snap.timings["pause_ms"])
            await box.snapshot.remove(f"m{i}")
            t = time.perf_counter()
            await box.suspend()
            out[f"suspend_{label}"].append(ms(time.perf_counter() - t))
            sizes[f"device_state_kib_{label}"].append((box_dir / memory.STATE).stat().st_size / 1024)
            sizes[f"ram_data_mib_{label}"].append((box_dir / memory.RAM).stat().st_blocks * 512 / (1 << 20))
            # The suspended box's own memory snapshot: its saved RAM copied sparsely (the
            # running box's, above, is the baseline of the same size).
            t = time.perf_counter()
            await box.snapshot.create(f"s{i}", boxvm.SnapshotOptions(memory=True))
            out[f"memory_snapshot_suspended_{label}"].append(ms(time.perf_counter() - t))
            await box.snapshot.remove(f"s{i}")
            t = time.perf_counter()
            await box.start()
            await _first_exec(box)
            out[f"resume_to_exec_{label}"].append(ms(time.perf_counter() - t))
            await _print_phases(box, f"resume {label}", t)
            rec = rt.backend.store.get_box(box.id)  # type: ignore[attr-defined]
            if rec is not None and rec.qemu_pid:
                rss = psutil.Process(rec.qemu_pid).memory_info().rss
                sizes[f"resumed_qemu_rss_mib_{label}"].append(rss / (1 << 20))
            # Interleaved baseline: the same resume with the supervisor started as a fresh
            # interpreter (no zygote, engine/zygote).
            await box.suspend()
            with _direct_supervisors():
                t = time.perf_counter()
                await box.start()
                await _first_exec(box)
            out[f"resume_to_exec_direct_supervisor_{label}"].append(ms(time.perf_counter() - t))
            await _print_phases(box, f"resume {label} (direct supervisor)", t)
        await box.stop()
        t = time.perf_counter()
        await box.start()
        await _first_exec(box)
        out[f"cold_start_to_exec_{label}"].append(ms(time.perf_counter() - t))
    finally:
        await rt.remove(box.id, force=True)
    for key, values in sizes.items():
        print(f"{key}: {', '.join(f'{v:.1f}' for v in values)}")
    # Without soft-dirty the RAM is copied whole while the guest is stopped (no pre-copy).
    print(f"soft-dirty pre-copy: {'yes' if memory_precopy.supported() else 'no (the kernel lacks it)'}")
    return out


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


@contextlib.contextmanager
def _direct_supervisors() -> Iterator[None]:
    """Starts in this block run each supervisor as a fresh interpreter (the baseline)."""
    os.environ["BOXVM_ZYGOTE"] = "0"
    try:
        yield
    finally:
        del os.environ["BOXVM_ZYGOTE"]


async def _print_phases(box: boxvm.Box, what: str, t0: float) -> None:
    """Where a resume's time went (the supervisor's timings, engine/memory_ops), with the load."""
    total = ms(time.perf_counter() - t0)
    timings = (await box.info()).timings
    keys = ("start", "boot", "resume_qemu", "resume_load", "resume_guest", "resume_clock")
    parts = ", ".join(f"{k} {timings[f'{k}_ms']:.0f}" for k in keys if f"{k}_ms" in timings)
    print(f"{what}: to first exec {total:.0f} ms ({parts} ms; {_load()})")


def _qemu(rt: boxvm.Runtime, box_id: str) -> psutil.Process:
    rec = rt.backend.store.get_box(box_id)  # type: ignore[attr-defined]
    assert rec is not None and rec.qemu_pid
    return psutil.Process(rec.qemu_pid)


def _ram_private_mib(pid: int) -> float:
    """The guest RAM pages only this fork holds: its mapping of ``memory.base`` (share=off),
    Private_Clean + Private_Dirty (the copy-on-write copies of pages it wrote)."""
    total_kib, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                inside = line.rstrip().endswith(memory.BASE)
            elif inside and line.startswith(("Private_Clean:", "Private_Dirty:")):
                total_kib += int(line.split()[1])
    return total_kib / 1024


async def _print_fork_phases(rt: boxvm.Runtime, boxes: list[boxvm.Box], label: str) -> None:
    """The forks' median phases (engine/memory_ops timings) and their QEMUs' CPU so far."""
    timings = [(await b.info()).timings for b in boxes]
    keys = ("start", "boot", "resume_qemu", "resume_load", "resume_guest", "resume_clock")
    med = {k: statistics.median(t.get(f"{k}_ms", 0.0) for t in timings) for k in keys}
    cpu = [sum(_qemu(rt, b.id).cpu_times()[:2]) for b in boxes]
    parts = ", ".join(f"{k} {v:.0f}" for k, v in med.items())
    print(f"forks {label} medians: {parts} ms; QEMU CPU {statistics.median(cpu):.2f} s each, {sum(cpu):.1f} s in all")


async def _guest_used_mib(box: boxvm.Box) -> float:
    """MemTotal - MemAvailable in the guest: what it uses, page cache it could drop aside."""
    out = (await box.exec(["sh", "-c", "grep -E '^Mem(Total|Available):' /proc/meminfo"])).stdout.decode().split()
    return (int(out[1]) - int(out[4])) / 1024


async def forks_and_warm(rt: boxvm.Runtime, mib: int, runs: int, forks: int = 10) -> dict[str, list[float]]:
    label = "2g" if mib >= 2048 else f"{mib}m"
    out: dict[str, list[float]] = {
        f"warm_start_to_exec_{label}": [],
        f"forks_{forks}_to_running_{label}": [],
        f"forks_{forks}_to_running_direct_supervisor_{label}": [],
        f"fork_rss_per_guest_used_{label}": [],
        f"fork_uss_per_guest_used_{label}": [],
        f"fork_ram_private_per_guest_used_{label}": [],
        f"stream_resume_to_exec_{label}": [],
        f"stream_resumed_rss_per_guest_used_{label}": [],
    }
    options = boxvm.BoxOptions(memory_mib=mib)
    for i in range(runs):
        box = await rt.create(options, name=f"bench-warm-{label}-{i}-{os.getpid()}")
        try:
            t = time.perf_counter()
            await box.start()
            await _first_exec(box)
            out[f"warm_start_to_exec_{label}"].append(ms(time.perf_counter() - t))
        finally:
            await rt.remove(box.id, force=True)
    print(f"warm starts {label}: {out[f'warm_start_to_exec_{label}']} ms ({_load()})")
    # Booted cold: a warm-started box's RAM is private (a fork's), so its memory
    # snapshot would hold the RAM in the stream and its forks share no pages.
    cold = boxvm.BoxOptions(memory_mib=mib, warm=False)
    parent = await rt.create(cold, name=f"bench-fork-parent-{label}-{os.getpid()}")
    try:
        await parent.start()
        await parent.snapshot.create("m", boxvm.SnapshotOptions(memory=True))
        used = await _guest_used_mib(parent)
        for _ in range(max(1, runs // 3)):
            with _direct_supervisors():  # the interleaved baseline: a fresh interpreter per supervisor
                t = time.perf_counter()
                direct = await parent.clone_many(
                    forks, options=boxvm.CloneOptions(from_snapshot="m", start_after_clone=True)
                )
                out[f"forks_{forks}_to_running_direct_supervisor_{label}"].append(ms(time.perf_counter() - t))
            await asyncio.gather(*(rt.remove(b.id, force=True) for b in direct))
            direct_ms = out[f"forks_{forks}_to_running_direct_supervisor_{label}"][-1]
            print(f"{forks} forks {label}, direct supervisors: {direct_ms:.0f} ms ({_load()})")
            t = time.perf_counter()
            boxes = await parent.clone_many(
                forks, options=boxvm.CloneOptions(from_snapshot="m", start_after_clone=True)
            )
            out[f"forks_{forks}_to_running_{label}"].append(ms(time.perf_counter() - t))
            await _print_fork_phases(rt, boxes, label)
            try:
                await asyncio.gather(*(_first_exec(b) for b in boxes))
                for b in boxes:
                    mem = _qemu(rt, b.id).memory_full_info()
                    out[f"fork_rss_per_guest_used_{label}"].append(round(mem.rss / (1 << 20) / used, 3))
                    out[f"fork_uss_per_guest_used_{label}"].append(round(mem.uss / (1 << 20) / used, 3))
                    private = _ram_private_mib(_qemu(rt, b.id).pid)
                    out[f"fork_ram_private_per_guest_used_{label}"].append(round(private / used, 3))
                print(
                    f"{forks} forks {label}: {out[f'forks_{forks}_to_running_{label}'][-1]:.0f} ms, guest used"
                    f" {used:.0f} MiB ({_load()})"
                )
                # The baseline: the same guest state loaded by QEMU's own migrate-incoming,
                # RAM in the stream (what a fork's own suspend writes with BOXVM_MEMORY_STREAM).
                with _stream():
                    (first,) = await parent.clone_many(
                        1, options=boxvm.CloneOptions(from_snapshot="m", start_after_clone=True)
                    )
                boxes.append(first)  # removed with the others
                await first.suspend()
                t = time.perf_counter()
                await first.start()
                await _first_exec(first)
                out[f"stream_resume_to_exec_{label}"].append(ms(time.perf_counter() - t))
                rss = _qemu(rt, first.id).memory_info().rss / (1 << 20)
                out[f"stream_resumed_rss_per_guest_used_{label}"].append(round(rss / used, 3))
            finally:
                await asyncio.gather(*(rt.remove(b.id, force=True) for b in boxes))
    finally:
        await rt.remove(parent.id, force=True)
    return out


@contextlib.contextmanager
def _stream() -> Iterator[None]:
    """Boxes started in this block save private RAM in QEMU's migration stream, a
    stop-and-copy (``BOXVM_MEMORY_STREAM``, ``BOXVM_PRECOPY_MAX_S``): the baseline."""
    os.environ.update(BOXVM_MEMORY_STREAM="1", BOXVM_PRECOPY_MAX_S="0")
    try:
        yield
    finally:
        del os.environ["BOXVM_MEMORY_STREAM"], os.environ["BOXVM_PRECOPY_MAX_S"]


# Guest load while the snapshots are taken: 32 MiB written to /dev/shm once, then a counter
# rewritten every 50 ms (what the issue measured the warm-start pause with).
_WARM_LOAD = (
    "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=32 2>/dev/null;"
    " nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done' >/dev/null 2>&1 &"
)


async def warm_snapshot_pauses(rt: boxvm.Runtime, mib: int, runs: int) -> dict[str, list[float]]:
    """Memory snapshot guest pause of warm-started boxes (private RAM): boxvm's way (under
    TCG the pages the guest wrote, copied over the template's RAM file with the guest
    stopped; under KVM QEMU's live pre-copy) against the stop-and-copy of all of the RAM in
    QEMU's migration stream, two boxes of the machine, snapshots taken alternately; then
    one suspend of each and its resume to the first exec (boxvm's way gives the box a RAM
    file of its own; the stream is loaded into a fresh one)."""
    label = "2g" if mib >= 2048 else f"{mib}m"
    key, base_key = f"memory_snapshot_pause_warm_{label}", f"memory_snapshot_pause_warm_stream_{label}"
    out: dict[str, list[float]] = {key: [], base_key: []}
    options = boxvm.BoxOptions(memory_mib=mib)
    box = await rt.create(options, name=f"bench-warm-{label}-{os.getpid()}")
    base = await rt.create(options, name=f"bench-warm-stream-{label}-{os.getpid()}")
    try:
        await box.start()
        with _stream():
            await base.start()
        for b in (box, base):
            assert "resume_ms" in (await b.info()).timings, "not warm-started: no template for this machine"
            await b.exec(["sh", "-c", _WARM_LOAD])
        for i in range(runs):
            for b, k in ((box, key), (base, base_key)) if i % 2 == 0 else ((base, base_key), (box, key)):
                snap = await b.snapshot.create(f"w{i}", boxvm.SnapshotOptions(memory=True))
                out[k].append(snap.timings["pause_ms"])
                t = (await b.info()).timings
                how = (
                    f"{t['memory_snapshot_written_mib']:.0f} MiB written by the guest copied in"
                    f" {t['memory_snapshot_written_ms']:.0f} ms, the template's file copied before in"
                    f" {t['memory_snapshot_base_copy_ms']:.0f} ms"
                    if b is box and "memory_snapshot_written_mib" in t
                    else f"state {t.get('memory_snapshot_stream_mib', 0):.0f} MiB, QEMU's downtime"
                    f" {t.get('memory_snapshot_qemu_downtime_ms', 0):.0f} ms, prefill before the stop"
                    f" {t.get('memory_snapshot_prefill_ms', 0):.0f} ms"
                )
                print(f"{k}: {snap.timings['pause_ms']:.0f} ms ({how}; {_load()})")
                await b.snapshot.remove(f"w{i}")
        for b, suffix in ((box, ""), (base, "_stream")):
            info = await b.suspend()
            out.setdefault(f"suspend_warm_stopped{suffix}_{label}", []).append(info.timings["suspend_stopped_ms"])
            t0 = time.perf_counter()
            await b.start()
            await _first_exec(b)
            resumed = ms(time.perf_counter() - t0)
            out.setdefault(f"resume_warm_to_exec{suffix}_{label}", []).append(resumed)
            print(
                f"suspend_warm_stopped{suffix}_{label}: {info.timings['suspend_stopped_ms']:.0f} ms"
                f" (suspend {info.timings['suspend_ms']:.0f} ms), then resume to first exec {resumed:.0f} ms"
                f" ({_load()})"
            )
    finally:
        await asyncio.gather(rt.remove(box.id, force=True), rt.remove(base.id, force=True))
    return out


async def with_template(rt: boxvm.Runtime, mib: int, runs: int, parts: set[str]) -> dict[str, list[float]]:
    """The parts that need the machine's warm-start template, made here and removed after."""
    label = "2g" if mib >= 2048 else f"{mib}m"
    template = await rt.templates.create(boxvm.BoxOptions(memory_mib=mib))
    print(f"template {template.id} for {label}: {template.size_bytes / (1 << 20):.0f} MiB allocated ({_load()})")
    results: dict[str, list[float]] = {}
    try:
        if "warm-pause" in parts:
            results.update(await warm_snapshot_pauses(rt, mib, runs))
        if "forks" in parts:
            results.update(await forks_and_warm(rt, mib, runs))
    finally:
        with contextlib.suppress(boxvm.errors.NotFound):  # removed meanwhile (a test run on this home)
            await rt.templates.remove(template.id)
    return results


async def run_memory(home: Home, runs: int) -> dict[str, list[float]]:
    """``BOXVM_BENCH_MEMORY_MIB`` (default ``512,2048``) picks the guest sizes,
    ``BOXVM_BENCH_MEMORY_PARTS`` (default ``resume,warm-pause,forks``) the parts."""
    results: dict[str, list[float]] = {}
    sizes = [int(mib) for mib in os.environ.get("BOXVM_BENCH_MEMORY_MIB", "512,2048").split(",")]
    parts = set(os.environ.get("BOXVM_BENCH_MEMORY_PARTS", "resume,warm-pause,forks").split(","))
    async with boxvm.Runtime(home.root) as rt:
        for mib in sizes:
            if "resume" in parts:
                results.update(await one_size(rt, home, mib, runs))
            if parts & {"warm-pause", "forks"}:
                results.update(await with_template(rt, mib, runs, parts))
    return results
