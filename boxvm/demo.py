"""The main job: the box lifecycle and every state operation on the built-in image, timed.

``python -m boxvm.demo`` creates a box, runs and streams commands, stops and restarts it,
then snapshots it while running, restores, clones (from the running box and, in a batch,
from a snapshot), exports it to an archive and imports that as a new box, then suspends
and resumes it, takes and restores a memory snapshot, forks it three times, exports the
suspended box with its memory and resumes the imported copy, and starts a new box from the
warm-start template. Every box it makes is removed at the end.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import boxvm

PREFIX = "boxvm-demo"


class Clock:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def step(self, label: str, extra: str = "") -> None:
        ms = (time.perf_counter() - self.t) * 1000
        print(f"  {label:<44} {ms:9.1f} ms  {extra}")
        self.t = time.perf_counter()


async def read(box: boxvm.Box, path: str) -> str:
    r = await box.exec(["sh", "-c", f"cat {path} 2>/dev/null || echo '(absent)'"])
    return r.stdout.decode().strip().replace("\n", " | ")


async def main() -> None:
    async with boxvm.Runtime() as rt:
        for info in await rt.list():  # left over from an interrupted run
            if info.name.startswith(PREFIX):
                await rt.remove(info.id, force=True)
        print("boxvm demo on the built-in Debian image\n\nlifecycle")
        clock = Clock()
        box = await rt.create(boxvm.BoxOptions(), name=PREFIX)
        clock.step("create")
        try:
            await box.start()
            clock.step("start (boot to agent ready)")
            first = "uname -sr; . /etc/os-release; echo $PRETTY_NAME; cat /etc/hostname; python3 -c 'print(6*7)'"
            r = await box.exec(["sh", "-c", first])
            clock.step("first exec", r.stdout.decode().strip().replace("\n", " | "))
            await box.exec(["true"])
            clock.step("warm exec round trip")
            proc = await box.spawn(["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"])
            arrivals = []
            async for chunk in proc.stdout:
                arrivals.append(f"{chunk.decode().strip()}@{(time.perf_counter() - clock.t) * 1000:.0f}ms")
            await proc.wait()
            clock.step("streamed output", ", ".join(arrivals))
            await box.exec(["sh", "-c", "echo 'written before the restart' > /root/note"])
            await box.stop()
            clock.step("stop (guest syncs and unmounts)")
            await box.start()
            clock.step("start again", f"/root/note: {await read(box, '/root/note')}")

            print("\nstate operations")
            await box.exec(["sh", "-c", "echo v1 > /root/version"])
            snap = await box.snapshot.create("v1")
            clock.step("snapshot of the running box", f"guest pause {snap.timings['pause_ms']:.1f} ms")
            await box.exec(["sh", "-c", "echo v2 > /root/version"])
            twin = await box.clone(f"{PREFIX}-twin")
            clock.step("clone of the running box", f"guest pause {(await twin.info()).timings['pause_ms']:.1f} ms")
            await box.stop()
            clock.step("stop")
            await box.snapshot.restore("v1")
            clock.step("restore v1 (stopped box)")
            await box.start()
            clock.step("start", f"/root/version: {await read(box, '/root/version')} (was v2 before restore)")
            await twin.start()
            clock.step("start the twin", f"/root/version: {await read(twin, '/root/version')}")
            workers = await box.clone_many(
                3, boxvm.CloneOptions(from_snapshot="v1"), names=[f"{PREFIX}-w{i}" for i in range(3)]
            )
            clock.step("3 clones from snapshot v1 in one call")
            with tempfile.TemporaryDirectory() as tmp:
                path = await box.export(Path(tmp))
                size = path.stat().st_size >> 20
                clock.step("export of the running box (verified archive)", f"{path.name}, {size} MiB")
                copy = await rt.import_box(path, name=f"{PREFIX}-imported")
                clock.step("import (verified before the box exists)")
            await copy.start()
            clock.step("start the imported box", f"/root/note: {await read(copy, '/root/note')}")

            print("\nmemory state")
            counter = "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i >/tmp/count; sleep .2; done' >/dev/null 2>&1 &"
            await box.exec(["sh", "-c", counter])
            boot = await read(box, "/proc/sys/kernel/random/boot_id")
            await box.suspend()
            clock.step("suspend (RAM + device state saved, QEMU exits)")
            await box.start()
            same = await read(box, "/proc/sys/kernel/random/boot_id") == boot
            clock.step("start resumes it", f"counter at {await read(box, '/tmp/count')}, same boot: {same}")
            warm = await box.snapshot.create("warm", boxvm.SnapshotOptions(memory=True))
            clock.step("memory snapshot of the running box", f"guest pause {warm.timings['pause_ms']:.1f} ms")
            await box.stop()
            await box.snapshot.restore("warm")
            clock.step("restore it", f"status {(await box.info()).status.value}")
            await box.start()
            clock.step("start resumes the snapshot", f"counter at {await read(box, '/tmp/count')}")
            forks = await box.clone_many(
                3,
                boxvm.CloneOptions(from_snapshot="warm", start_after_clone=True),
                names=[f"{PREFIX}-f{i}" for i in range(3)],
            )
            seen = [f"{await read(f, '/proc/sys/kernel/hostname')}: {await read(f, '/tmp/count')}" for f in forks]
            clock.step("3 forks of it, each resumed running", "counter in " + ", ".join(seen))
            await box.suspend()
            with tempfile.TemporaryDirectory() as tmp:
                path = await box.export(Path(tmp))
                clock.step("export of the suspended box (with its memory)", f"{path.stat().st_size >> 20} MiB")
                moved = await rt.import_box(path, name=f"{PREFIX}-moved")
                clock.step("import (memory state verified)", f"status {(await moved.info()).status.value}")
            await moved.start()
            clock.step("start resumes the imported box", f"counter at {await read(moved, '/tmp/count')}")
            kind = "warm, from a template" if await rt.templates.list() else "cold: no template (`boxvm setup`)"
            fresh = await rt.create(boxvm.BoxOptions(), name=f"{PREFIX}-new")
            await fresh.start()
            await fresh.exec(["true"])
            clock.step("a new box: start to first exec", kind)
            usage = await rt.disk_usage()
            print("\ndisk usage (owned / shared through common layers)")
            for name, (own, shared) in sorted(usage.boxes.items()):
                if name.startswith(PREFIX):
                    print(f"  {name:<28} {own >> 10:>8} KiB own {shared >> 10:>8} KiB shared")
            info = await box.info()
            print(f"\nrecorded timings of {info.name}: {info.timings}")
            del workers
        finally:
            for info in await rt.list():
                if info.name.startswith(PREFIX):
                    await rt.remove(info.id, force=True)
            clock.step("\nremove every demo box")
    print("demo finished")


if __name__ == "__main__":
    asyncio.run(main())
