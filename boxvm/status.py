"""Box statuses, the transition table, and the one guard every operation uses."""

from __future__ import annotations

from enum import StrEnum

from boxvm.errors import InvalidState


class BoxStatus(StrEnum):
    CONFIGURED = "configured"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    SNAPSHOTTING = "snapshotting"
    RESTORING = "restoring"
    CLONING = "cloning"
    EXPORTING = "exporting"
    REMOVING = "removing"
    SUSPENDING = "suspending"  # saving its memory state; QEMU exits next
    SUSPENDED = "suspended"  # memory and device state saved with the box; start() resumes it

    @property
    def is_live(self) -> bool:
        """A supervisor process (and so QEMU) is expected to exist."""
        return self in LIVE

    @property
    def is_transient(self) -> bool:
        return self in _TRANSIENT


LIVE = frozenset({BoxStatus.STARTING, BoxStatus.RUNNING, BoxStatus.PAUSED, BoxStatus.STOPPING, BoxStatus.SUSPENDING})
_TRANSIENT = frozenset(
    {
        BoxStatus.STARTING,
        BoxStatus.STOPPING,
        BoxStatus.SNAPSHOTTING,
        BoxStatus.RESTORING,
        BoxStatus.CLONING,
        BoxStatus.EXPORTING,
        BoxStatus.REMOVING,
        BoxStatus.SUSPENDING,
    }
)

# Which statuses each operation may start from, and the advice given otherwise.
ALLOWED: dict[str, tuple[frozenset[BoxStatus], str]] = {
    "start": (
        frozenset({BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.FAILED, BoxStatus.SUSPENDED}),
        "it is already running; stop it first",
    ),
    "stop": (frozenset({BoxStatus.RUNNING, BoxStatus.PAUSED, BoxStatus.STARTING}), "it is not running"),
    "exec": (frozenset({BoxStatus.RUNNING}), "start it first"),
    "copy": (frozenset({BoxStatus.RUNNING}), "start it first"),
    "pause": (frozenset({BoxStatus.RUNNING}), "it must be running"),
    "resume": (frozenset({BoxStatus.PAUSED}), "it must be paused"),
    "suspend": (frozenset({BoxStatus.RUNNING, BoxStatus.PAUSED}), "it must be running or paused"),
    "remove": (
        frozenset({BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.FAILED, BoxStatus.SUSPENDED}),
        "stop it first or pass force=True",
    ),
}


def require(operation: str, box: str, status: BoxStatus) -> None:
    """Raise :class:`InvalidState` naming the box, its status and what to do."""
    allowed, advice = ALLOWED[operation]
    if status not in allowed:
        raise InvalidState(f"cannot {operation} box {box!r} while it is {status.value}: {advice}")
