"""Public value types: what users pass in (options) and get back (info, results)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from boxvm.errors import InvalidArgument
from boxvm.status import BoxStatus

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SNAPSHOT_NAME_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}")


def check_name(name: str, what: str = "box") -> str:
    """Names: 1..128 chars of ``[A-Za-z0-9._-]``, not starting with ``.``, ``-`` or ``_``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_snapshot_name(name: str) -> str:
    """Snapshot names: 1..128 chars of ``[A-Za-z0-9._-]``, not starting with ``.``."""
    if not isinstance(name, str) or not SNAPSHOT_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid snapshot name {name!r}: use 1-128 characters of letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


TEMPLATE_ID_RE = re.compile(r"[0-9a-f]{16}")
BOX_ID_RE = re.compile(r"[0-9a-f]{32}")


def check_box_id(box_id: str) -> str:
    """A box id given by a caller (a box migrating keeps its own): 32 lowercase hex digits,
    as boxvm makes them; it names the box's directory."""
    if not isinstance(box_id, str) or not BOX_ID_RE.fullmatch(box_id):
        raise InvalidArgument(f"invalid box id {box_id!r:.40}: it is 32 lowercase hex digits")
    return box_id


def check_lease_holder(holder: str) -> str:
    """What a migration holds its box at the source by (``boxvm.migrate``): 64 lowercase hex
    digits, derived from the move's nonce, which the source never learns."""
    if not isinstance(holder, str) or not re.fullmatch(r"[0-9a-f]{64}", holder):
        raise InvalidArgument(f"invalid migration lease {holder!r:.70}: it is 64 lowercase hex digits")
    return holder


def check_presented_holder(holder: str | None) -> str | None:
    """A holder a request presents (none: it is part of no migration), checked as one taken."""
    return None if holder is None else check_lease_holder(holder)


def check_migration_nonce(nonce: str) -> str:
    """The nonce a migration imports its box with (``boxvm.migrate``): 32 lowercase hex digits."""
    if not isinstance(nonce, str) or not BOX_ID_RE.fullmatch(nonce):
        raise InvalidArgument(f"invalid migration nonce {nonce!r:.40}: it is 32 lowercase hex digits")
    return nonce


def check_template_id(template_id: str) -> str:
    """Template ids: 16 lowercase hex digits (a hash of the machine), nothing else: they
    name a directory on the server and a URL path segment in the client."""
    if not isinstance(template_id, str) or not TEMPLATE_ID_RE.fullmatch(template_id):  # (not $: it allows a final \n)
        raise InvalidArgument(
            f"invalid template id {template_id!r:.40}: it is 16 hex digits (`boxvm template ls` lists them)"
        )
    return template_id


@dataclass
class SnapshotOptions:
    quiesce: bool = True  # freeze the guest filesystem around a running-box capture
    quiesce_timeout_secs: float = 30
    stop_on_quiesce_fail: bool = True  # False: continue crash-consistent and say so
    memory: bool = False  # RAM + device state too (a running box); restore then resumes processes

    def validate(self) -> SnapshotOptions:
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


@dataclass
class TemplateInfo:
    """A warm-start template (``boxvm.templates``): the machine it serves and its cost."""

    id: str  # derived from the machine it serves (``templates.key``)
    image: str
    image_digest: str
    guest_bundle: str
    cpus: int
    memory_mib: int
    network: str
    disk_size_gb: int
    created_at: float
    size_bytes: int  # allocated bytes of its files (the RAM is sparse)


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
    warm: bool = True  # a first start resumes from a matching template, if one exists

    def validate(self) -> BoxOptions:
        """Types and bounds of every field: options also come from archives and REST callers."""
        self.check_types()
        if not 1 <= self.cpus <= 64:
            raise InvalidArgument(f"cpus must be between 1 and 64, not {self.cpus}")
        if not 128 <= self.memory_mib <= 65536:
            raise InvalidArgument(f"memory_mib must be between 128 and 65536, not {self.memory_mib}")
        if not 1 <= self.disk_size_gb <= 2048:
            raise InvalidArgument(f"disk_size_gb must be between 1 and 2048, not {self.disk_size_gb}")
        if self.network not in ("nat", "none"):
            raise InvalidArgument(f"network must be 'nat' or 'none', not {self.network!r:.64}")
        if self.ports and self.network == "none":
            raise InvalidArgument("ports need network='nat'")
        for host, guest in self.ports:
            if not (0 < host < 65536 and 0 < guest < 65536):
                raise InvalidArgument(f"port numbers must be 1..65535, not {(host, guest)!r}")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidArgument(f"bad environment variable {key!r:.64}")
        return self

    def check_types(self) -> BoxOptions:
        """Every field of the right type and every string and list bounded (not the ranges
        ``validate`` checks: an untrusted import clamps resources before validating)."""
        for key in ("cpus", "memory_mib", "disk_size_gb"):
            value = getattr(self, key)
            if not _is_int(value):
                raise InvalidArgument(f"{key} must be an integer, not {value!r:.64}")
        if not isinstance(self.warm, bool):
            raise InvalidArgument(f"warm must be true or false, not {self.warm!r:.64}")
        for key in ("image", "workdir", "user"):
            if getattr(self, key) is not None:
                _string(getattr(self, key), key, PATH_LIMIT)
        _string(self.network, "network", 16)
        if not isinstance(self.ports, list | tuple) or len(self.ports) > LIST_LIMIT:
            raise InvalidArgument(f"ports must be a list of at most {LIST_LIMIT} (host_port, guest_port) pairs")
        ports = []
        for pair in self.ports:
            if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(_is_int(p) for p in pair):
                raise InvalidArgument(f"ports entries are (host_port, guest_port) pairs, not {pair!r:.64}")
            ports.append((pair[0], pair[1]))
        self.ports = ports
        if not isinstance(self.env, dict) or len(self.env) > LIST_LIMIT:
            raise InvalidArgument(f"env must be a mapping of at most {LIST_LIMIT} variables")
        for key, value in self.env.items():
            _string(key, "an environment variable name")
            _string(value, f"environment variable {key[:64]}")
        for key in ("entrypoint", "cmd"):
            if getattr(self, key) is not None:
                setattr(self, key, _strings(getattr(self, key), key))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoxOptions:
        """Options from stored or received JSON (not validated: call ``validate``)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        ports = known.get("ports", [])
        if isinstance(ports, list):
            known["ports"] = [tuple(p) if isinstance(p, list | tuple) else p for p in ports]
        return cls(**known)


STRING_LIMIT = 64 << 10  # characters of one string from an image config or an archive
PATH_LIMIT = 4096  # characters of an image reference, working directory or user
LIST_LIMIT = 4096  # entries of Env, Entrypoint, Cmd, env or ports


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(value: object, what: str, limit: int = STRING_LIMIT) -> str:
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise InvalidArgument(f"{what} must be a string of at most {limit} characters without NUL bytes")
    return value


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > LIST_LIMIT:
        raise InvalidArgument(f"{what} must be a list of at most {LIST_LIMIT} strings")
    return [_string(v, f"each item of {what}") for v in value]


def check_image_config(config: object) -> dict[str, Any]:
    """The runtime part of an image config (from a registry, an OCI layout or an archive)
    as boxvm uses it: Env, Entrypoint, Cmd (lists of strings), WorkingDir, User (strings),
    each checked and bounded; other keys are dropped. Raises InvalidArgument."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise InvalidArgument("the image config must be a JSON object")
    out: dict[str, Any] = {}
    for key in ("Env", "Entrypoint", "Cmd"):
        if config.get(key) is not None:
            out[key] = _strings(config[key], f"image config {key}")
    for key in ("WorkingDir", "User"):
        if config.get(key) is not None:
            out[key] = _string(config[key], f"image config {key}", PATH_LIMIT)
    for item in out.get("Env", []):
        if not item.partition("=")[0]:
            raise InvalidArgument(f"image config Env entry {item[:64]!r} has no variable name")
    return out


def check_box_options(raw: object) -> dict[str, Any]:
    """Box options from untrusted JSON (an archive's manifest): the known fields with their
    types checked, and the image config; unknown fields are dropped. Ranges are left to
    ``validate``, after an untrusted import has clamped resources to this host."""
    if not isinstance(raw, dict):
        raise InvalidArgument("box options must be a JSON object")
    data = {k: v for k, v in raw.items() if k in BoxOptions.__dataclass_fields__}
    try:
        options = BoxOptions.from_dict(data).check_types()
    except TypeError as exc:
        raise InvalidArgument(f"box options have a field of the wrong type ({exc})") from exc
    out = options.to_dict()
    out["image_config"] = check_image_config(raw.get("image_config"))
    return out


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
    migration: str | None = None  # the nonce of the migration that brought the box here (``boxvm.migrate``)


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
    try:
        config = check_image_config(image_config)
    except InvalidArgument:
        config = {}  # a record written before image configs were checked: no default command
    entry = options.entrypoint if isinstance(options.entrypoint, list) else None
    own_cmd = options.cmd if isinstance(options.cmd, list) else None
    entrypoint = entry if entry is not None else config.get("Entrypoint") or []
    cmd = own_cmd if own_cmd is not None else [] if entry is not None else config.get("Cmd") or []
    return [a for a in [*entrypoint, *cmd] if isinstance(a, str)]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
