"""Box statuses, the transition table, and the one guard every operation uses."""

from __future__ import annotations

from dataclasses import dataclass
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


class Operation(StrEnum):
    """What a caller asks of a box (not a status: see :data:`RULES` for how they meet)."""

    START = "start"
    STOP = "stop"
    EXEC = "exec"
    COPY = "copy"
    PAUSE = "pause"
    RESUME = "resume"
    SUSPEND = "suspend"
    REMOVE = "remove"
    FORCE_REMOVE = "force-remove"
    SNAPSHOT = "snapshot"
    MEMORY_SNAPSHOT = "memory-snapshot"
    RESTORE = "restore"
    CLONE = "clone"
    EXPORT = "export"


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[BoxStatus]  # the statuses the operation may start from
    holds: BoxStatus | None  # the transient status it holds while it runs (None: it holds none)
    advice: str  # what to do when the box is in another status
    verb: str  # how messages name the operation
    exclusive: bool = True  # refused while a state operation (snapshot, clone, ...) holds the box
    moves: bool = False  # would take the box from its host: only its move's, while one holds it


_AT_REST = frozenset({BoxStatus.CONFIGURED, BoxStatus.STOPPED, BoxStatus.FAILED})
_VM_UP = frozenset({BoxStatus.RUNNING, BoxStatus.PAUSED})
_CAPTURABLE = _AT_REST | _VM_UP
_REMOVABLE = _AT_REST | {BoxStatus.SUSPENDED}
# A suspended box's disk belongs with its saved memory: a capture of it alone would drop the
# processes, so it is exported or snapshotted with its memory, or started first.
_SUSPENDED_ADVICE = (
    "it must be stopped, running or paused (a suspended box: start it first, export it, or snapshot it"
    " with memory=True)"
)

# The one table: every operation's starting statuses, the status it holds, and the advice.
RULES: dict[Operation, Rule] = {
    Operation.START: Rule(_REMOVABLE, BoxStatus.STARTING, "it is already running; stop it first", "start"),
    Operation.STOP: Rule(_VM_UP | {BoxStatus.STARTING}, BoxStatus.STOPPING, "it is not running", "stop"),
    Operation.EXEC: Rule(frozenset({BoxStatus.RUNNING}), None, "start it first", "exec", exclusive=False),
    Operation.COPY: Rule(frozenset({BoxStatus.RUNNING}), None, "start it first", "copy", exclusive=False),
    Operation.PAUSE: Rule(frozenset({BoxStatus.RUNNING}), None, "it must be running", "pause"),
    Operation.RESUME: Rule(frozenset({BoxStatus.PAUSED}), None, "it must be paused", "resume"),
    Operation.SUSPEND: Rule(_VM_UP, BoxStatus.SUSPENDING, "it must be running or paused", "suspend"),
    Operation.REMOVE: Rule(_REMOVABLE, BoxStatus.REMOVING, "stop it first or pass force=True", "remove", moves=True),
    Operation.FORCE_REMOVE: Rule(frozenset(BoxStatus), BoxStatus.REMOVING, "", "remove", moves=True),
    Operation.SNAPSHOT: Rule(_CAPTURABLE, BoxStatus.SNAPSHOTTING, _SUSPENDED_ADVICE, "snapshot"),
    # a suspended box's: its disk at rest and a copy of its saved memory state
    Operation.MEMORY_SNAPSHOT: Rule(
        _VM_UP | {BoxStatus.SUSPENDED},
        BoxStatus.SNAPSHOTTING,
        "it has no memory to capture; start it first, or use memory=False for its disk",
        "take a memory snapshot of",
    ),
    Operation.RESTORE: Rule(
        _AT_REST,
        BoxStatus.RESTORING,
        "a disk-only snapshot restores a stopped box: stop it first",
        "restore",
    ),
    Operation.CLONE: Rule(_CAPTURABLE, BoxStatus.CLONING, _SUSPENDED_ADVICE, "clone"),
    # a suspended box's archive carries its memory state (archive's memory.state)
    Operation.EXPORT: Rule(
        _CAPTURABLE | {BoxStatus.SUSPENDED}, BoxStatus.EXPORTING, "it has no disk state to export", "export", moves=True
    ),
}


def require(operation: Operation, box: str, status: BoxStatus, busy: Operation | None = None) -> Rule:
    """The guard every operation passes: raise :class:`InvalidState` naming the box, its
    shown status and what to do, unless ``operation`` may start from ``status`` (with the
    state operation ``busy`` holding the box, if any). Returns the operation's rule."""
    rule = RULES[operation]
    shown = (RULES[busy].holds if busy is not None else None) or status
    if busy is not None and rule.exclusive:
        raise InvalidState(f"cannot {rule.verb} box {box!r}: it is {shown.value} right now; wait for that to finish")
    if status not in rule.allowed:
        raise InvalidState(f"cannot {rule.verb} box {box!r} while it is {shown.value}: {rule.advice}")
    return rule


def require_holder(operation: Operation, box: str, held_by: str | None, holder: str | None) -> None:
    """The guard of a box a migration holds (``options.lease``, ``Backend.lease``): what
    would take it from its host (``Rule.moves``: export, remove) comes only from that move,
    so a second driver (also one that takes no lease) cannot give the box two owners. It
    is used as before otherwise: run at the source meanwhile, it is moved as it is then."""
    rule = RULES[operation]
    if rule.moves and held_by is not None and held_by != holder:
        raise InvalidState(
            f"cannot {rule.verb} box {box!r}: a migration is moving it; let it finish, or give it up from the"
            " home that began it (`boxvm migrate BOX --to URL --release`)"
        )


# The statuses operations hold while they run (from the one table).
_TRANSIENT = frozenset(rule.holds for rule in RULES.values() if rule.holds is not None)
