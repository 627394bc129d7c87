"""Drives BoxLite 0.10.8 for ``bench/compare.py``; runs in BoxLite's own scratch venv.

    python boxlite_driver.py HOME OCI_LAYOUT

Reads one command per line on stdin and answers one JSON line: ``setup ARCHIVE`` creates
the subject box (its ``start()`` fails without hardware virtualization, after the disk
is made), exports it to ARCHIVE and snapshots it as ``base``; ``round [ARCHIVE EXPORT]``
times snapshot create and restore, a clone and its removal, the removal of another snapshot
(after restoring ``base``: BoxLite refuses to remove one the disk depends on), an import of
ARCHIVE and an export of the subject to EXPORT (then deleted); ``boxes N`` grows the home to
N boxes with clones. Only host-side operations on stopped boxes are timed, as for boxvm.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import boxlite


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def main(home: str, layout: str) -> None:
    rt = boxlite.Boxlite(boxlite.Options(home_dir=home))
    box = None
    extra: list[str] = []
    n = 0
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd, *args = line.split()
        out: dict[str, object] = {}
        if cmd == "setup":
            box = await rt.create(boxlite.BoxOptions(rootfs_path=layout, disk_size_gb=1), name="bench-subject")
            try:
                await box.start()
            except Exception as exc:  # no hardware virtualization: the disk exists all the same
                out["start"] = str(exc)[:200]
            t = time.perf_counter()
            await box.export(dest=args[0])
            out["export_ms"] = ms(time.perf_counter() - t)
            await box.snapshot.create(name="base")  # each round returns here before removing its snapshot
        elif cmd == "round":
            assert box is not None
            n += 1
            t = time.perf_counter()
            await box.snapshot.create(name=f"s{n}")
            out["snapshot_create"] = ms(time.perf_counter() - t)
            t = time.perf_counter()
            await box.snapshot.restore(f"s{n}")
            out["snapshot_restore"] = ms(time.perf_counter() - t)
            t = time.perf_counter()
            clone = await box.clone_box(name=f"bench-c{n}")
            out["clone"] = ms(time.perf_counter() - t)
            t = time.perf_counter()
            await rt.remove(clone.id)
            out["remove"] = ms(time.perf_counter() - t)
            # BoxLite refuses to remove a snapshot the disk or a clone's base depends on
            await box.snapshot.create(name=f"r{n}")
            await box.snapshot.restore("base")
            t = time.perf_counter()
            await box.snapshot.remove(f"r{n}")
            out["snapshot_remove"] = ms(time.perf_counter() - t)
            if args:
                t = time.perf_counter()
                imported = await rt.import_box(args[0], name=f"bench-i{n}")
                out["import"] = ms(time.perf_counter() - t)
                await rt.remove(imported.id)
                t = time.perf_counter()
                await box.export(dest=args[1])
                out["export"] = ms(time.perf_counter() - t)
                os.unlink(args[1])
        elif cmd == "boxes":
            assert box is not None
            while len(extra) + 1 < int(args[0]):
                extra.append((await box.clone_box(name=f"bench-fill-{len(extra)}")).id)
            out["boxes"] = len(extra) + 1
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
