"""Named crash points for fault-injection tests.

``BOXVM_FAULT=<point>`` makes the process SIGKILL itself when it reaches that point,
so tests can crash a real operation between any two of its steps and check that
start-up recovery leaves every box usable. Unset, a point costs one dict lookup.
"""

import os
import signal


def point(name: str) -> None:
    if os.environ.get("BOXVM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
