"""Whether a process recorded in the store or in a file name still lives."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True if ``pid`` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
