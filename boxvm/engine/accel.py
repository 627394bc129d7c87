"""Choose KVM or TCG. ``/dev/kvm`` alone is not enough: some hosts expose a KVM (e.g.
nested "PVM") that cannot run a stock kernel, so hardware virtualization flags decide."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect(requested: str | None = None) -> Accel:
    """``requested`` (or ``$BOXVM_ACCEL``): ``auto`` (default), ``kvm`` or ``tcg``."""
    choice = (requested or os.environ.get("BOXVM_ACCEL") or "auto").lower()
    if choice == "tcg":
        return Accel("tcg", "TCG requested")
    hw = _cpu_flags() & {"vmx", "svm"}
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
        kvm_ok = True
    except OSError:
        kvm_ok = False
    if hw and kvm_ok:
        return Accel("kvm", f"KVM with hardware virtualization ({', '.join(sorted(hw))})")
    if choice == "kvm":
        from boxvm.errors import EngineError

        raise EngineError("KVM was requested but this host has no usable hardware virtualization")
    why = "no vmx/svm CPU flag" if not hw else "/dev/kvm cannot be opened"
    return Accel("tcg", f"TCG software emulation ({why}); boxes boot in seconds instead of milliseconds")
