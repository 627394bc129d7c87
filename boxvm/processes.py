"""Whether a process recorded in the store or in a file name still lives."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True if ``pid`` exists and has not exited (also when it belongs to another user).

    A daemonised supervisor that exited stays a zombie until the init process reaps it,
    which some container inits do only every second or two: a zombie counts as gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # reaped meanwhile, or no procfs: kill() said it exists
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")
    # The state follows the command name, which is in parentheses and may itself hold ')'.
    state = stat[stat.rfind(b")") + 2 :][:1]
    return state != b"Z"
