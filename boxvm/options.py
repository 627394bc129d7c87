"""Public value types: what users pass in (options) and get back (info, results)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from boxvm.errors import InvalidArgument
from boxvm.status import BoxStatus

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SNAPSHOT_NAME_RE = re.compile(r"^(?!\.)[A-Za-z0-9._-]{1,128}$")


def check_name(name: str, what: str = "box") -> str:
    """Names: 1..128 chars of ``[A-Za-z0-9._-]``, not starting with ``.``, ``-`` or ``_``."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_snapshot_name(name: str) -> str:
    """Snapshot names: 1..128 chars of ``[A-Za-z0-9._-]``, not starting with ``.``."""
    if not isinstance(name, str) or not SNAPSHOT_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid snapshot name {name!r}: use 1-128 characters of letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


@dataclass
class SnapshotOptions:
    quiesce: bool = True  # freeze the guest filesystem around a running-box capture
    quiesce_timeout_secs: float = 30
    stop_on_quiesce_fail: bool = True  # False: continue crash-consistent and say so
    memory: bool = False  # RAM + device state (not supported yet)

    def validate(self) -> SnapshotOptions:
        if self.memory:
            raise InvalidArgument("memory snapshots are not supported yet: use memory=False")
        if not 0 < self.quiesce_timeout_secs <= 3600:
            raise InvalidArgument("quiesce_timeout_secs must be between 0 and 3600")
        return self


@dataclass
class CloneOptions:
    cow: bool = True  # False: an independent, flattened full copy
    start_after_clone: bool = False
    from_snapshot: str | None = None  # clone this snapshot instead of the current state
    snapshot: SnapshotOptions = field(default_factory=SnapshotOptions)  # capture of a running source


@dataclass
class ExportOptions:
    compress: bool = True  # zstd
    compression_level: int = 3  # 1..22
    include_metadata: bool = True  # box options in the manifest (never its env: it may hold secrets)

    def validate(self) -> ExportOptions:
        if not 1 <= self.compression_level <= 22:
            raise InvalidArgument(f"compression_level must be 1..22, not {self.compression_level}")
        return self


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    name: str
    box_id: str
    created_at: float
    size_bytes: int  # bytes this snapshot's own layer holds
    container_disk_bytes: int  # allocated bytes of the whole container-disk chain it needs
    guest_disk_bytes: int  # guest root state captured (0: the guest root is not part of snapshots)
    consistency: str  # "frozen", "crash" or "stopped"
    has_memory: bool
    timings: dict[str, float]  # capture_ms, and pause_ms: the guest-visible write pause


@dataclass(frozen=True)
class DiskUsage:
    """Bytes on the host per box and snapshot: owned alone, and shared with others."""

    boxes: dict[str, tuple[int, int]]  # box name -> (owned, shared)
    snapshots: dict[str, tuple[int, int]]  # "box/snapshot" -> (owned, shared)
    layers_bytes: int  # everything in the layer store


@dataclass
class BoxOptions:
    image: str | None = None  # None: the embedded default image
    cpus: int = 1
    memory_mib: int = 512
    disk_size_gb: int = 4
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    network: str = "nat"
    ports: list[tuple[int, int]] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None

    def validate(self) -> BoxOptions:
        if not 1 <= self.cpus <= 64:
            raise InvalidArgument(f"cpus must be between 1 and 64, not {self.cpus}")
        if not 128 <= self.memory_mib <= 65536:
            raise InvalidArgument(f"memory_mib must be between 128 and 65536, not {self.memory_mib}")
        if not 1 <= self.disk_size_gb <= 2048:
            raise InvalidArgument(f"disk_size_gb must be between 1 and 2048, not {self.disk_size_gb}")
        if self.network not in ("nat", "none"):
            raise InvalidArgument(f"network must be 'nat' or 'none', not {self.network!r}")
        if self.ports and self.network == "none":
            raise InvalidArgument("ports need network='nat'")
        ports = []
        for pair in self.ports:
            try:
                host, guest = (int(p) for p in pair)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"ports entries are (host_port, guest_port) pairs, not {pair!r}") from exc
            if not (0 < host < 65536 and 0 < guest < 65536):
                raise InvalidArgument(f"port numbers must be 1..65535, not {pair!r}")
            ports.append((host, guest))
        self.ports = ports
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in str(value):
                raise InvalidArgument(f"bad environment variable {key!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoxOptions:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["ports"] = [tuple(p) for p in known.get("ports", [])]
        return cls(**known)


@dataclass(frozen=True)
class BoxInfo:
    id: str
    name: str
    status: BoxStatus
    image: str
    created_at: float
    started_at: float | None
    cpus: int
    memory_mib: int
    disk_size_bytes: int
    disk_bytes: int  # bytes the box's own disk layer holds on the host
    chain_depth: int  # qcow2 files under the box's disk: its top, captured layers, the image base
    ports: list[tuple[int, int]]
    guest_bundle: str | None
    error: str | None
    timings: dict[str, float]  # milliseconds of the last create/start/stop, boot, ...
    command: list[str]  # the default command: entrypoint + cmd, from the options or the image


@dataclass(frozen=True)
class ImageInfo:
    reference: str  # the first name it was used by: normalised (docker.io/library/alpine:3.20) or a path
    digest: str  # the linux/amd64 manifest's digest: the image's identity
    size_bytes: int  # its blobs (compressed layers, config, manifest)
    created_at: float  # when it entered this cache
    references: list[str]  # every name it was used by (tags, digests, paths)


def default_command(options: BoxOptions, image_config: dict[str, Any]) -> list[str]:
    """Entrypoint + Cmd with Docker's rules: options override the image, and overriding the
    entrypoint drops the image's Cmd."""
    entrypoint = options.entrypoint if options.entrypoint is not None else image_config.get("Entrypoint") or []
    if options.cmd is not None:
        cmd = options.cmd
    else:
        cmd = [] if options.entrypoint is not None else image_config.get("Cmd") or []
    return [str(a) for a in [*entrypoint, *cmd]]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
