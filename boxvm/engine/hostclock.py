"""The host's TSC rate, which a TCG guest's TSC ticks at.

Under TCG, QEMU answers the guest's ``rdtsc`` with the host's own ``rdtsc`` (plus an
offset), and the guest kernel cannot calibrate it (no PIT reference on ``microvm``), so it
must be told the rate with ``tsc_early_khz``. A wrong rate makes every guest clock run
fast or slow by the same factor (2 GHz on a 2.6 GHz host: 30 % fast).

Sources, best first: the kernel's ``tsc_freq_khz`` (only some kernels have it); a
calibration of ``rdtsc`` against ``CLOCK_MONOTONIC`` (exactly what TCG passes through,
and NTP-disciplined like the host's own clocks); the kernel log's calibration (often
unreadable to users); ``cpu MHz`` (may be the current, scaled frequency: a last resort).
A result is cached per boot, since the TSC rate is fixed for a boot on ``constant_tsc``
CPUs, so a start pays the ~0.2 s calibration once per host boot.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("boxvm")

CACHE_FILE = "tsc-khz.json"
SANE_KHZ = range(100_000, 20_000_000)  # 100 MHz .. 20 GHz
CALIBRATION_SECS = 0.2

# Python's stdlib has no rdtsc and a compiled helper would need a compiler on every host,
# so these ten fixed bytes are run through ctypes from a page mapped W, then R+X (never both):
# 0f31 rdtsc; 48c1e220 shl rdx, 32; 4809d0 or rax, rdx; c3 ret -- the 64-bit TSC in rax.
_RDTSC_CODE = bytes.fromhex("0f31 48c1e220 4809d0 c3")


def tsc_khz(cache_dir: Path | None) -> int:
    """The host's TSC rate in kHz (cached in ``cache_dir`` for this boot, if given)."""
    sysfs = _read_int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"))
    # (`None in range(...)` compares None with each of the range's ~20 M numbers: ~2 s.)
    if sysfs is not None and sysfs in SANE_KHZ:
        return sysfs  # type: ignore[return-value]
    if cache_dir is None:
        return _measure()[0]
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cache = cache_dir / CACHE_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id and cached.get("khz") in SANE_KHZ:
            return int(cached["khz"])
    except (OSError, ValueError, AttributeError):
        pass
    khz, source = _measure()
    log.info("host TSC rate %d kHz (from %s)", khz, source)
    # unique per call: concurrent starts in one process (threads) measure and write at once
    tmp = cache.with_name(f".{CACHE_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps({"boot_id": boot_id, "khz": khz, "source": source}))
    os.replace(tmp, cache)
    return khz


def _measure() -> tuple[int, str]:
    if "constant_tsc" not in _cpu_flags():
        log.warning("this CPU's TSC rate is not constant: clocks in TCG boxes will drift")
    try:
        khz = calibrate()
        if khz in SANE_KHZ:
            return khz, "calibration"
    except (OSError, AttributeError) as exc:  # no libc mmap/mprotect, or exec mappings refused
        log.info("cannot calibrate the TSC (%s); trying the kernel log", exc)
    khz = _from_kernel_log()
    if khz in SANE_KHZ:
        return khz, "kernel log"  # type: ignore[return-value]
    khz = _from_cpuinfo()
    if khz in SANE_KHZ:
        log.warning("host TSC rate taken from /proc/cpuinfo's cpu MHz; box clocks may drift if it scales")
        return khz, "cpuinfo"  # type: ignore[return-value]
    raise OSError("cannot determine the host's TSC rate")


def calibrate(seconds: float = CALIBRATION_SECS) -> int:
    """TSC ticks per millisecond of CLOCK_MONOTONIC, over ``seconds``."""
    read, release = _rdtsc()
    try:

        def sample() -> tuple[int, int]:
            # The clock read bracketed most tightly by two TSC reads (a preemption
            # between them would show up as a wide bracket and is skipped).
            best = (1 << 64, 0, 0)
            for _ in range(50):
                a = read()
                t = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                b = read()
                if b - a < best[0]:
                    best = (b - a, (a + b) // 2, t)
            return best[1], best[2]

        c0, t0 = sample()
        time.sleep(seconds)
        c1, t1 = sample()
    finally:
        release()
    return round((c1 - c0) * 1_000_000 / (t1 - t0))


def _rdtsc() -> tuple[Callable[[], int], Callable[[], None]]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = mmap.PAGESIZE
    rw, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    addr = libc.mmap(None, size, rw, flags, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap failed")
    ctypes.memmove(addr, _RDTSC_CODE, len(_RDTSC_CODE))
    if libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        err = ctypes.get_errno()
        libc.munmap(addr, size)
        raise OSError(err, "mprotect(PROT_EXEC) refused")
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(addr), lambda: libc.munmap(addr, size)


def _from_kernel_log() -> int | None:
    for argv in (["dmesg"], ["journalctl", "-k", "-b", "-q", "--no-pager"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        # The refined calibration (against HPET/PM timer) is finer than the early one.
        for pattern in (r"Refined TSC clocksource calibration: ([\d.]+) MHz", r"tsc: Detected ([\d.]+) MHz"):
            found = re.findall(pattern, out)
            if found:
                return round(float(found[-1]) * 1000)
    return None


def _from_cpuinfo() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    return round(float(found.group(1)) * 1000) if found else None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    found = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(found.group(1).split()) if found else set()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
