"""Guest clocks keep the host's time: right after start, over 30 s, and for a ``sleep``.

Under TCG the guest's TSC ticks at the host's rate, so a wrong ``tsc_early_khz`` makes
every guest clock run fast or slow by the same factor. Readings come from one process
in the box that answers each line on stdin with its clocks at once: a reading is then
bracketed by the host's clocks just before the request and just after the answer (a few
milliseconds apart), instead of by a whole exec with its process start-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

import boxvm

pytestmark = [pytest.mark.asyncio, pytest.mark.backends("local", "remote")]

# The sleep is the probe's own nanosleep, as `sleep 5` does: timing the sleep binary from
# the host would add its fork and exec (hundreds of ms under TCG on a loaded host).
PROBE = """
import sys, time
for line in sys.stdin:
    if line.strip() == "sleep":
        print("before", flush=True)
        time.sleep(5)
        print("after", flush=True)
    else:
        print(time.time_ns(), time.clock_gettime_ns(time.CLOCK_MONOTONIC), flush=True)
"""
WALL_TOLERANCE_NS = 100_000_000  # 100 ms
RATE_TOLERANCE = 0.001  # 0.1 %
PACE_SECS = 30.0


@dataclass(frozen=True)
class Reading:
    host_wall: tuple[int, int]  # host CLOCK_REALTIME before the request, after the answer
    host_mono: tuple[int, int]
    guest_wall: int
    guest_mono: int

    @property
    def rtt_ns(self) -> int:
        return self.host_mono[1] - self.host_mono[0]

    @property
    def wall_error_ns(self) -> int:
        """How far the guest's wall clock lies outside the host's bracket (0: inside it)."""
        lo, hi = self.host_wall
        return max(lo - self.guest_wall, self.guest_wall - hi, 0)


class Probe:
    def __init__(self, proc: boxvm.Process) -> None:
        self.proc = proc
        self.chunks = aiter(proc.stdout)
        self.buf = b""

    async def line(self) -> bytes:
        while b"\n" not in self.buf:
            self.buf += await asyncio.wait_for(anext(self.chunks), 30)
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    async def reading(self, tries: int = 5) -> Reading:
        """The reading with the tightest bracket of a few."""
        best = None
        for _ in range(tries):
            w0, m0 = time.time_ns(), time.monotonic_ns()
            await self.proc.write(b"t\n")
            guest_wall, guest_mono = map(int, (await self.line()).split())
            r = Reading((w0, time.time_ns()), (m0, time.monotonic_ns()), guest_wall, guest_mono)
            best = r if best is None or r.rtt_ns < best.rtt_ns else best
        assert best is not None
        return best


@dataclass
class ClockBox:
    box: boxvm.Box
    probe: Probe
    first: Reading  # taken as soon as the box had started


@pytest_asyncio.fixture(scope="module")
async def clock_box(rt: boxvm.Runtime, worker: str) -> AsyncIterator[ClockBox]:
    # a cold boot: the clock set at boot is what is judged (a warm start's step is test_forks')
    box = await rt.create(boxvm.BoxOptions(warm=False), name=f"clock-{worker}-{time.monotonic_ns() % 10**6}")
    try:
        await box.start()
        probe = Probe(await box.spawn(["python3", "-u", "-c", PROBE]))
        first = await probe.reading()
        yield ClockBox(box, probe, first)
        probe.proc.close_stdin()
        assert await probe.proc.wait() == 0
    finally:
        await rt.remove(box.id, force=True)


async def test_wall_clock_is_right_right_after_start(clock_box: ClockBox) -> None:
    first = clock_box.first
    assert first.rtt_ns < 50_000_000, f"the probe answered too slowly to judge: {first.rtt_ns / 1e6:.1f} ms"
    assert first.wall_error_ns <= WALL_TOLERANCE_NS, f"guest wall clock off by {first.wall_error_ns / 1e6:.1f} ms"


async def test_sleep_takes_as_long_on_the_host(clock_box: ClockBox) -> None:
    """Both markers travel the same path, so their gap on the host is the guest's sleep."""
    probe = clock_box.probe
    await probe.proc.write(b"sleep\n")
    assert await probe.line() == b"before"
    t0 = time.monotonic()
    assert await probe.line() == b"after"
    elapsed = time.monotonic() - t0
    assert abs(elapsed - 5.0) <= 0.1, f"a 5 s sleep in the box took {elapsed:.3f} s of host time"


async def test_clocks_keep_pace_with_the_host(clock_box: ClockBox) -> None:
    probe = clock_box.probe
    start = await probe.reading()
    await asyncio.sleep(max(0.0, PACE_SECS - (time.monotonic_ns() - start.host_mono[0]) / 1e9))
    end = await probe.reading()
    host = (end.host_mono[0] + end.host_mono[1] - start.host_mono[0] - start.host_mono[1]) / 2
    guest = end.guest_mono - start.guest_mono
    uncertainty = (start.rtt_ns + end.rtt_ns) / 2
    assert host >= PACE_SECS * 1e9
    assert abs(guest - host) <= RATE_TOLERANCE * host + uncertainty, (
        f"guest CLOCK_MONOTONIC ran at {guest / host:.5f}x the host's over {host / 1e9:.1f} s"
    )
    for r in (start, end):
        assert r.wall_error_ns <= WALL_TOLERANCE_NS, f"guest wall clock off by {r.wall_error_ns / 1e6:.1f} ms"
