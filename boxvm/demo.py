"""The main job: the box lifecycle on the built-in image, with timings.

``python -m boxvm.demo`` creates a box, runs commands, streams output, writes a file,
stops and restarts the box and shows the file survived, then removes the box.
"""

from __future__ import annotations

import asyncio
import time

import boxvm

DEMO_BOX = "boxvm-demo"


async def main() -> None:
    timings: list[tuple[str, float]] = []

    def step(label: str, t0: float) -> None:
        ms = (time.perf_counter() - t0) * 1000
        timings.append((label, ms))
        print(f"  {label:<34} {ms:9.1f} ms")

    async with boxvm.Runtime() as rt:
        if await rt.get(DEMO_BOX) is not None:  # left over from an interrupted run
            await rt.remove(DEMO_BOX, force=True)
        print("boxvm demo: a micro-VM on the built-in Debian image")
        t = time.perf_counter()
        box = await rt.create(boxvm.BoxOptions(), name=DEMO_BOX)
        step("create", t)
        try:
            t = time.perf_counter()
            await box.start()
            step("start (boot to agent ready)", t)

            t = time.perf_counter()
            r = await box.exec(["sh", "-c", "uname -sr; cat /etc/hostname; python3 -c 'print(6*7)'"])
            step("first exec", t)
            print("    " + r.stdout.decode().strip().replace("\n", "\n    "))

            t = time.perf_counter()
            await box.exec(["true"])
            step("warm exec round trip", t)

            print("  streaming output as it is produced:")
            proc = await box.spawn(["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"])
            t = time.perf_counter()
            async for chunk in proc.stdout:
                print(f"    +{(time.perf_counter() - t) * 1000:6.0f} ms  {chunk.decode().strip()}")
            await proc.wait()

            r = await box.exec(["sh", "-c", "echo 'hello from before the restart' > /root/note; sync"])
            print(f"  wrote /root/note (exit {r.exit_code})")
            t = time.perf_counter()
            await box.stop()
            step("stop (guest syncs and unmounts)", t)
            t = time.perf_counter()
            await box.start()
            step("start again", t)
            r = await box.exec(["cat", "/root/note"])
            print(f"  /root/note after restart: {r.stdout.decode().strip()!r}")
            if r.stdout != b"hello from before the restart\n":
                raise SystemExit("the file did not survive the restart")
            info = await box.info()
            print(f"  box {info.name} ({info.id[:12]}) {info.status.value}, disk layer {info.disk_bytes >> 10} KiB")
            print(f"  recorded timings: {info.timings}")
        finally:
            t = time.perf_counter()
            await rt.remove(box.id, force=True)
            step("remove", t)
    print("demo finished")


if __name__ == "__main__":
    asyncio.run(main())
