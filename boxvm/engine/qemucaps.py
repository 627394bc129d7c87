"""What this host's QEMU can do for memory state (and whether it runs sandboxed and
confined), probed once per QEMU binary and cached.

Suspend, memory snapshots and resuming an imported memory state need a guest RAM in a
``memory-backend-file`` (QEMU built for POSIX hosts) and the ``x-ignore-shared`` migration
capability (QEMU 4.0+). The probe asks the binary itself rather than parsing its version:
a QEMU with ``-machine none`` and such a RAM object, whose QMP lists the capabilities
(about 0.1 s). The answer is kept per binary (path, inode, size, mtime) in the home's
cache, so an upgraded or replaced QEMU is probed again (and on a kernel with another Landlock).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from boxvm.engine import confine
from boxvm.engine.qemu import SANDBOX, qemu_binary
from boxvm.errors import Unsupported

CACHE_FILE = "qemu-caps.json"
PROBE_TIMEOUT = 20.0
_MEMO: dict[str, QemuCaps] = {}


@dataclass(frozen=True)
class QemuCaps:
    version: str  # "7.2.22"; "" when QEMU did not start
    memory_file: bool  # -object memory-backend-file works
    ignore_shared: bool  # the x-ignore-shared migration capability exists
    reason: str  # why not, in QEMU's words ("" when both work)
    sandbox: bool  # -sandbox qemu.SANDBOX works (QEMU built with libseccomp)
    confined: bool  # a microvm starts under confine.for_qemu (a kernel with Landlock)

    @property
    def memory_state(self) -> bool:
        return self.memory_file and self.ignore_shared


def _key(binary: str) -> str:
    """The binary as it is now, and the kernel's Landlock (whether it confines depends on both)."""
    st = os.stat(binary)
    return f"{binary}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|landlock-{confine.abi()}"


def probe(cache: Path, binary: str | None = None) -> QemuCaps:
    """The capabilities of ``binary`` (default: the QEMU boxes run on), from the cache if it
    has this very binary."""
    binary = binary or qemu_binary()
    key = _key(binary)
    if key in _MEMO:
        return _MEMO[key]
    path = cache / CACHE_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entries = known if isinstance(known, dict) else {}
    try:
        found = QemuCaps(**entries[key]) if key in entries else None
    except TypeError:  # an entry of another boxvm (other fields): probed again, the others kept
        found = None
    if found is None:
        found, definite = _run(binary)
        entries[key] = asdict(found)
        # A probe that timed out on a loaded host is kept by this process only; a read-only
        # cache only costs a probe next time.
        with contextlib.suppress(OSError):
            if definite:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{CACHE_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # (threads probe too)
                tmp.write_text(json.dumps(entries))
                os.replace(tmp, path)
    _MEMO[key] = found
    return found


def _run(binary: str) -> tuple[QemuCaps, bool]:
    """The capabilities, and whether they are definite (no probe timed out)."""
    with tempfile.TemporaryDirectory(prefix="boxvm-qemu-probe-") as tmp:
        ram = Path(tmp) / "ram"
        argv = [
            binary, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
            "-object", f"memory-backend-file,id=probe,size=2M,mem-path={tmp}/ram,share=on",
        ]  # fmt: skip
        ram.touch()
        try:
            done = _ask(argv, "query-migrate-capabilities")
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"QEMU could not be run to probe it: {exc}"
            return QemuCaps("", False, False, why, False, False), not isinstance(exc, subprocess.TimeoutExpired)
    replies = []
    for line in done.stdout.splitlines():
        with contextlib.suppress(ValueError):
            replies.append(json.loads(line))
    greeting = next((r["QMP"] for r in replies if isinstance(r, dict) and "QMP" in r), None)
    if greeting is None:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
        return QemuCaps("", False, False, why, False, False), True
    v = greeting.get("version", {}).get("qemu", {})
    version = f"{v.get('major', 0)}.{v.get('minor', 0)}.{v.get('micro', 0)}"
    names = {
        c.get("capability")
        for r in replies
        if isinstance(r, dict) and isinstance(r.get("return"), list)
        for c in r["return"]
        if isinstance(c, dict)
    }
    sandbox, confined = _sandboxed(binary), _confined(binary)
    definite = confined is not None
    if "x-ignore-shared" not in names:
        why = "QEMU has no x-ignore-shared migration capability (QEMU 4.0 added it)"
        return QemuCaps(version, True, False, why, sandbox, bool(confined)), definite
    return QemuCaps(version, True, True, "", sandbox, bool(confined)), definite


def _sandboxed(binary: str) -> bool:
    """Whether QEMU starts under its seccomp sandbox (``qemu.SANDBOX``)."""
    argv = [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-sandbox", SANDBOX, "-qmp", "stdio"]
    try:
        done = _ask(argv)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and '"QMP"' in done.stdout


def _confined(binary: str) -> bool | None:
    """Whether a box's machine (its firmware loaded, its QMP socket made) starts under the
    Landlock ruleset of a box's QEMU: not on a kernel without Landlock, nor with a QEMU
    that needs files outside what ``confine.for_qemu`` grants. None: the probe timed out
    (a loaded host), which says nothing either way."""
    with tempfile.TemporaryDirectory(prefix="boxvm-qemu-probe-") as tmp:
        argv = [
            binary, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-nodefaults", "-display", "none",
            "-S", "-qmp", "stdio", "-chardev", f"socket,id=probe,path={tmp}/probe.sock,server=on,wait=off",
        ]  # fmt: skip
        try:
            policy = confine.for_qemu(Path(tmp), [], [], binary)
        except OSError:
            return False
        try:
            done = _ask(argv, preexec_fn=policy.enter)
        except subprocess.TimeoutExpired:
            return None
        except (OSError, subprocess.SubprocessError):
            return False
        finally:
            policy.close()
    return done.returncode == 0 and '"QMP"' in done.stdout


def _ask(
    argv: list[str], *commands: str, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a probing QEMU (``-qmp stdio``) through ``commands``, between the handshake and ``quit``."""
    script = "".join(json.dumps({"execute": c}) + "\n" for c in ("qmp_capabilities", *commands, "quit"))
    return subprocess.run(
        argv, input=script, capture_output=True, text=True, timeout=PROBE_TIMEOUT, preexec_fn=preexec_fn
    )


def require_memory_state(cache: Path, what: str) -> QemuCaps:
    """Raise :class:`Unsupported` (naming ``what`` was asked) unless this host's QEMU can
    save and load memory state."""
    caps = probe(cache)
    if not caps.memory_state:
        raise Unsupported(
            f"cannot {what}: this host's QEMU cannot keep memory state ({caps.reason}); a QEMU of version 4.0 or"
            " later built for Linux can. Disk snapshots, clones and exports work without it"
        )
    return caps
