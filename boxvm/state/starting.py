"""What a start began from, so that a start whose process died before its supervisor ran
can be undone (issue 16: the starting window of a migration's resume).

A start writes ``start-<token>.json`` in the box's directory, made durable (the status it
starts from, its owner: its pid and that process's start time, and the ``started_at`` it is
about to write: the start's token) before it marks the box ``starting``. The file is named
by the token, so a start that loses the mark to a racing one replaces nothing of the
winner's (it removes its own). Two parties may then settle the winning start, each by a
compare-and-set on the box's row (``starting``, that token, no supervisor yet), so exactly
one of them wins:

- the supervisor the start spawned registers itself (``Store.register_supervisor``) before
  it touches anything of the box; one that finds its start gone exits;
- recovery (``Boxes.reconcile``) puts a ``starting`` box with no supervisor back to the
  recorded status (``Store.roll_back_start``) once the start's process is gone -- the same
  pid with the same start time, so a reused pid is not taken for it; never while it lives,
  however slow (a start undone under a live starter would go on to act on the box, over a
  later start's). A suspended box stays suspended with its memory state intact, instead of
  being called failed and later booted cold without its processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from boxvm import locks
from boxvm.disks.layers import fsync_dir
from boxvm.status import BoxStatus

_PREFIX, _SUFFIX = "start-", ".json"
_LEGACY = "start.json"  # an older boxvm's single record (its owner by pid alone)
_LEFTOVER_S = 60.0  # a record this much older than a start that won the mark is no start's
_SPAWN_LOCK = "spawn.lock"


@dataclass(frozen=True)
class Start:
    token: float  # the started_at the start wrote with ``starting``
    prior: BoxStatus  # the status it started from
    prior_started_at: float | None
    owner: int  # the pid of the process that started it
    owner_since: int | None = None  # that process's start time (/proc/<pid>/stat field 22)


def mine(token: float, prior: BoxStatus, prior_started_at: float | None) -> Start:
    """The record of a start this process makes."""
    return Start(token, prior, prior_started_at, os.getpid(), process_start(os.getpid()))


def _path(box_dir: Path, token: float) -> Path:
    return box_dir / f"{_PREFIX}{token!r}{_SUFFIX}"


def record(box_dir: Path, start: Start) -> None:
    """Written, durably, before the box is marked ``starting`` (a crash before the mark
    leaves a record no start matches, which is never read)."""
    # A temp name of its own: two starts of one box in one process (threads) must not share one.
    fd, tmp = tempfile.mkstemp(prefix=f".{_PREFIX}", suffix=".tmp", dir=box_dir)
    data = {"token": start.token, "prior": start.prior.value, "prior_started_at": start.prior_started_at}
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data | {"owner": start.owner, "owner_since": start.owner_since}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _path(box_dir, start.token))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(box_dir)


def give_up(box_dir: Path, start: Start) -> None:
    """The start's own roll-back failed (the store raised): its record names no owner now
    (pid 0, never a process's), so recovery undoes the start at the next look at the box
    instead of waiting for this long-lived process to die."""
    record(box_dir, Start(start.token, start.prior, start.prior_started_at, 0, None))


def read(box_dir: Path, token: float | None) -> Start | None:
    """The record of the start whose token is ``token`` (or an older boxvm's ``start.json``
    of it: a box that boxvm left ``starting``)."""
    if token is None:
        return None
    for path in (_path(box_dir, token), box_dir / _LEGACY):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(path.read_text())
            was = None if data["prior_started_at"] is None else float(data["prior_started_at"])
            since = None if data.get("owner_since") is None else int(data["owner_since"])
            owner = int(data["owner"])
            if path.name == _LEGACY and time.time() - token >= _LEFTOVER_S:
                owner = 0  # its owner is known by pid alone: after its minute, no start (its rule then)
            start = Start(float(data["token"]), BoxStatus(data["prior"]), was, owner, since)
            if start.token == token and not start.prior.is_live:
                return start
    return None


def discard(box_dir: Path, token: float) -> None:
    """The start is settled (its supervisor runs, it failed, or it was undone)."""
    _path(box_dir, token).unlink(missing_ok=True)


def discard_leftovers(box_dir: Path, token: float) -> None:
    """Records of starts settled without their process (killed after the supervisor took
    the box), removed by the next start once it holds the mark (and an older boxvm's
    ``start.json``)."""
    (box_dir / _LEGACY).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        for entry in os.scandir(box_dir):
            if entry.name.startswith(_PREFIX) and entry.name.endswith(_SUFFIX):
                with contextlib.suppress(ValueError):
                    other = float(entry.name[len(_PREFIX) : -len(_SUFFIX)])
                    if other < token - _LEFTOVER_S:
                        Path(entry.path).unlink(missing_ok=True)


def owner_alive(start: Start) -> bool:
    """The start's own process still runs: its pid, with the start time it had then."""
    since = process_start(start.owner) if start.owner > 0 else None
    return since is not None and (start.owner_since is None or since == start.owner_since)


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/<pid>/stat field 22); None if it
    is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 on
    except (OSError, IndexError):
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class SpawnLock:
    """Held by a start from its last read of the box's record until its supervisor has
    taken the box (or failed to): the span in which it clears the box's sockets, writes
    ``vm.json`` and spawns. A stop plus a second start landing after that read would
    otherwise have their sockets unlinked and ``vm.json`` replaced by the first start; with
    the lock the second start reads the record (and finds itself the start) only after the
    first's supervisor has refused the box. A ``flock`` on a file of the box's directory:
    the kernel drops it when its holder dies, so a killed start blocks nobody."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    async def acquire(cls, box_dir: Path) -> SpawnLock:
        return cls(await locks.acquire(box_dir / _SPAWN_LOCK, follow=False))

    def release(self) -> None:
        """Idempotent: the lock goes with the descriptor."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
