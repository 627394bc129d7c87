"""What a start began from, so that a start whose process died before its supervisor ran
can be undone (issue 16: the starting window of a migration's resume).

A start writes ``start.json`` in the box's directory (the status it starts from, its own
pid, and the ``started_at`` it is about to write: the start's token) before it marks the
box ``starting``. Two parties may then settle that start, each by a compare-and-set on
the box's row (``starting``, that token, no supervisor yet), so exactly one of them wins:

- the supervisor the start spawned registers itself (``Store.register_supervisor``); one
  that finds its start gone kills its QEMU before the guest resumes anything and exits;
- recovery (``Boxes.reconcile``) puts a ``starting`` box with no supervisor back to the
  recorded status (``Store.roll_back_start``) once the start's process is dead, or the
  start is a minute old: a suspended box stays suspended with its memory state intact,
  instead of being called failed and later booted cold without its processes.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from boxvm.status import BoxStatus

FILE = "start.json"


@dataclass(frozen=True)
class Start:
    token: float  # the started_at the start wrote with ``starting``
    prior: BoxStatus  # the status it started from
    prior_started_at: float | None
    owner: int  # the pid of the process that started it


def record(box_dir: Path, start: Start) -> None:
    """Written before the box is marked ``starting`` (a crash before the mark leaves a
    record no start matches, which is never read)."""
    tmp = box_dir / f".{FILE}.{os.getpid()}"
    data = {"token": start.token, "prior": start.prior.value, "prior_started_at": start.prior_started_at}
    tmp.write_text(json.dumps(data | {"owner": start.owner}))
    os.replace(tmp, box_dir / FILE)


def read(box_dir: Path, token: float | None) -> Start | None:
    """The record of the start whose token is ``token``, if it is the one on file."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        data = json.loads((box_dir / FILE).read_text())
        was = None if data["prior_started_at"] is None else float(data["prior_started_at"])
        start = Start(float(data["token"]), BoxStatus(data["prior"]), was, int(data["owner"]))
        if token is not None and start.token == token and not start.prior.is_live:
            return start
    return None
