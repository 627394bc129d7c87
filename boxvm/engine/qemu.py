"""The QEMU command line for a box: ``microvm``, direct kernel boot, virtio-mmio devices."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from boxvm.engine.accel import Accel
from boxvm.errors import EngineError

# seccomp: no exec or fork, no privilege or scheduling changes, no obsolete calls. A QEMU
# taken over through its device models (by the guest, or by an imported device state: a REST
# upload's memory.state is QEMU's migration stream) cannot run programs.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class VmSpec:
    box_dir: Path
    kernel: Path
    initramfs: Path
    disk: Path
    guest_disk: Path
    cpus: int
    memory_mib: int
    network: str
    ports: list[tuple[int, int]]
    mac: str
    hostname: str
    machine_id: str  # 32 hex digits, like /etc/machine-id; the box id
    # Under TCG the guest's TSC ticks at the host's rate (see hostclock), which its kernel
    # cannot calibrate without a PIT and must be told; KVM guests use kvm-clock instead.
    tsc_khz: int | None = None
    # Guest RAM in this file (``memory-backend-file``) instead of anonymous memory, so a
    # suspend or memory snapshot needs to save only the device state (``engine/memory``).
    # share=True: the file is the RAM itself; False: a private copy-on-write mapping (forks).
    memory_file: Path | None = None
    memory_shared: bool = True
    incoming: bool = False  # wait for ``migrate-incoming`` (a resume) instead of booting
    # False: the state to load has no configuration section (``memory.has_configuration``),
    # nor the description a migration ends with (its loader would report it missing)
    send_configuration: bool = True
    sandbox: bool = True  # ``-sandbox SANDBOX`` (``qemucaps``: a QEMU built without seccomp lacks it)


def new_mac() -> str:
    """A random MAC in QEMU's locally administered 52:54:00 range (each box has its own)."""
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*secrets.token_bytes(3))


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise EngineError("qemu-system-x86_64 is not installed: run the README's set-up command")
    return path


def argv(spec: VmSpec, accel: Accel) -> list[str]:
    d = spec.box_dir
    # Expedited RCU grace periods: FIFREEZE takes three percpu-rwsem write locks, each
    # waiting for a grace period that an idle NO_HZ guest makes ~10 ms long.
    cmdline = ["console=ttyS0", "reboot=t", "panic=-1", "quiet", "loglevel=3", "rcupdate.rcu_expedited=1"]
    if accel.name == "tcg":
        if spec.tsc_khz is None:
            raise EngineError("a TCG guest needs the host's TSC rate (VmSpec.tsc_khz)")
        # tsc=reliable: the boot-time clocksource watchdog compares the TSC with jiffies,
        # which lose ticks under TCG, and would switch the guest to that losing clock.
        cmdline += [f"tsc_early_khz={spec.tsc_khz}", "tsc=reliable"]
    cmdline += [f"boxvm.hostname={spec.hostname}", f"boxvm.net={spec.network}", f"boxvm.machine_id={spec.machine_id}"]
    args = [
        qemu_binary(),
        "-name", f"boxvm-{d.name}",
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on" + (",memory-backend=mem" if spec.memory_file else "")
        + ("" if spec.send_configuration else ",suppress-vmdesc=on"),
        "-accel", accel.name,
        "-cpu", "host" if accel.name == "kvm" else "max",
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *(["-sandbox", SANDBOX] if spec.sandbox else []),
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initramfs),
        "-append", " ".join(cmdline),
        "-serial", "stdio",  # the supervisor keeps it in a capped console.log (engine/console.py)
        "-qmp", f"unix:{d / 'qmp.sock'},server=on,wait=off",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={d / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=boxvm.agent",
    ]  # fmt: skip
    # Node names are stable handles for live disk operations (blockdev-snapshot-sync).
    for node, path, serial in (("guest", spec.guest_disk, "boxvm-guest"), ("data", spec.disk, "boxvm-data")):
        blockdev = {
            "driver": "qcow2",
            "node-name": node,
            "discard": "unmap",
            "file": {"driver": "file", "filename": str(path), "node-name": f"{node}-file"},
        }
        args += ["-blockdev", json.dumps(blockdev), "-device", f"virtio-blk-device,drive={node},serial={serial}"]
    if spec.memory_file is not None:
        share = "on" if spec.memory_shared else "off"
        args += [
            "-object",
            f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={_opt(spec.memory_file)},share={share}",
        ]
    if spec.incoming:
        args += ["-incoming", "defer"]
    if not spec.send_configuration:
        args += ["-global", "migration.send-configuration=off"]
    if spec.network == "nat":
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in spec.ports)
        args += ["-netdev", f"user,id=net0{fwd}", "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}"]
    return args


def _opt(path: Path) -> str:
    """A path inside a QEMU ``key=value,...`` option: a comma is written twice."""
    return str(path).replace(",", ",,")
