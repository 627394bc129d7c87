"""The ``.boxsnap`` archive: writing it in one pass and reading it with full verification.

Writing: the container disk's chain is flattened by ``qcow2.flatten_plan`` (layout from
metadata, then data clusters in order), and those bytes go straight through SHA-256 into
a tar member inside a zstd stream inside a temporary file: one pass, no intermediate
copy. ``manifest.json`` comes last because it carries the checksum.

Reading trusts nothing: members are limited in name, type, count and size while they
stream (before the manifest is seen, since it comes last), checksums and sizes are
compared with the manifest, and the disk must be a standalone qcow2 whose tables stay
inside the file, judged by our reader and by ``qemu-img check``.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from boxvm.disks import qcow2
from boxvm.errors import AlreadyExists, ArchiveError, InvalidArgument, StorageError

FORMAT = "boxvm-archive"
VERSION = 1
DISK = "disk.qcow2"
GUEST_DISK = "guest-rootfs.qcow2"
MEMORY = "memory.state"
MANIFEST = "manifest.json"
MEMBERS = {DISK, GUEST_DISK, MEMORY, MANIFEST}
MANIFEST_LIMIT = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Progress = Callable[[int], None]  # bytes done so far


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: dict[str, Any]


def write_archive(
    top: Path,
    dest: Path,
    manifest: dict[str, Any],
    *,
    compress: bool,
    level: int,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``top``'s flattened disk and the manifest to ``dest`` (never a partial file there)."""
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with partial.open("xb") as raw:
            full = write_stream(top, raw, manifest, compress=compress, level=level, progress=progress)
            os.fsync(raw.fileno())
        os.rename(partial, dest)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise write_failed(exc, dest) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return ExportResult(dest, full)


def destination(dest: Path, box_name: str) -> Path:
    """Where an export goes: ``dest``, or ``<box>.boxsnap`` inside it if it is a directory;
    never over an existing file."""
    dest = Path(dest).expanduser().absolute()
    if dest.is_dir():
        dest = dest / f"{box_name}.boxsnap"
    if not dest.parent.is_dir():
        raise InvalidArgument(f"cannot export to {dest}: {dest.parent} is not a directory")
    if dest.exists():
        raise AlreadyExists(f"{dest} already exists: remove it or choose another destination")
    return dest


def write_failed(exc: OSError, dest: Path) -> StorageError:
    """The error for an archive that could not be written (nothing is left at ``dest``)."""
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on the device of {dest.parent}: the archive was not written")
    return StorageError(f"could not write {dest}: {exc.strerror or exc}")


def write_stream(
    top: Path,
    raw: IO[bytes],
    manifest: dict[str, Any],
    *,
    compress: bool,
    level: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the archive of ``top``'s chain to ``raw`` strictly in order (a file, a pipe or
    an HTTP response); returns the full manifest written last."""
    plan = qcow2.flatten_plan(top)
    if compress:
        import zstandard

        # Multithreaded, with 2 MiB jobs: the default job size made the compressor hold
        # ~60 MB (measured) for no gain in speed here.
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=-1, job_size=2 << 20)
        cctx = zstandard.ZstdCompressor(compression_params=params)
        out: IO[bytes] = cctx.stream_writer(raw, closefd=False)  # type: ignore[assignment]
    else:
        out = raw
    # Members are written by hand (header block, data, zero padding): tarfile's
    # stream writer re-slices its buffer on every write, which made export 5x
    # slower than hashing and compressing the same bytes.
    out.write(_info(DISK, plan.size).tobuf(format=tarfile.PAX_FORMAT))
    sha, count = hashlib.sha256(), 0
    for chunk in plan.chunks():
        sha.update(chunk)
        out.write(chunk)
        count += len(chunk)
        if progress is not None:
            progress(count)
    if count != plan.size:
        raise StorageError(f"the disk stream ended after {count} of {plan.size} bytes")
    out.write(b"\0" * (-count % tarfile.BLOCKSIZE))
    full = {
        **manifest,
        "format": FORMAT,
        "version": VERSION,
        "container_disk_checksum": f"sha256:{sha.hexdigest()}",
        "guest_disk_checksum": "",
        "disk_virtual_size": plan.virtual_size,
        "disk_data_bytes": plan.data_bytes,
        "members": {DISK: plan.size},
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    body = json.dumps(full, indent=2, sort_keys=True).encode()
    out.write(_info(MANIFEST, len(body)).tobuf(format=tarfile.PAX_FORMAT))
    out.write(body + b"\0" * (-len(body) % tarfile.BLOCKSIZE))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
    if compress:
        out.close()  # flushes the zstd frame; raw stays open (closefd=False)
    raw.flush()
    return full


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(datetime.datetime.now(datetime.UTC).timestamp())
    return info


@dataclass(frozen=True)
class VerifiedArchive:
    manifest: dict[str, Any]
    disk: Path  # the verified standalone container disk, in the staging directory


def _open_stream(raw: Any) -> IO[bytes]:
    if raw.peek(4)[:4] == ZSTD_MAGIC:  # a buffered file or a ThreadReader: both can peek
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[return-value]
    return raw


def read_archive(
    archive: Path | IO[bytes], work: Path, max_disk_bytes: int, progress: Progress | None = None, label: str = ""
) -> VerifiedArchive:
    """Stream ``archive`` (a file, or a stream such as an upload) into ``work`` and verify
    everything; raises ArchiveError. ``label`` names it in messages."""
    import zstandard

    if isinstance(archive, Path):
        with archive.open("rb") as raw:
            return read_archive(raw, work, max_disk_bytes, progress, label or archive.name)
    label = label or "the archive"

    seen: dict[str, tuple[int, str]] = {}
    manifest_bytes = b""
    done = 0
    try:
        with tarfile.open(fileobj=_open_stream(archive), mode="r|") as tar:
            for member in tar:
                name = member.name
                if name not in MEMBERS:
                    raise ArchiveError(f"{label}: unexpected member {name!r} (absolute, '..' or unknown)")
                if name in seen or (name == MANIFEST and manifest_bytes):
                    raise ArchiveError(f"{label}: duplicate member {name!r}")
                if not member.isreg():  # (GNU sparse members count as regular: BoxLite writes them)
                    raise ArchiveError(f"{label}: member {name!r} is a link, device or directory")
                limit = MANIFEST_LIMIT if name == MANIFEST else max_disk_bytes
                if member.size > limit:
                    raise ArchiveError(f"{label}: {name} declares {member.size} bytes, over the limit of {limit}")
                source = tar.extractfile(member)
                if source is None:
                    raise ArchiveError(f"{label}: cannot read {name}")
                if name == MANIFEST:
                    manifest_bytes = source.read(MANIFEST_LIMIT + 1)
                    seen[name] = (len(manifest_bytes), "")
                    continue
                h = hashlib.sha256()
                count = 0
                with (work / name).open("xb") as out:
                    while chunk := source.read(1 << 20):
                        count += len(chunk)
                        if count > limit:
                            raise ArchiveError(f"{label}: {name} is larger than the limit of {limit}")
                        h.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done)
                    out.flush()
                    os.fsync(out.fileno())
                if count != member.size:
                    raise ArchiveError(f"{label}: {name} is truncated")
                seen[name] = (count, f"sha256:{h.hexdigest()}")
    except ArchiveError:
        raise
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise ArchiveError(f"{label} is truncated or corrupt ({exc}); nothing was imported") from exc
    except OSError as exc:
        if exc.errno == 28:
            raise StorageError("no space left while importing: free some space; nothing was imported") from exc
        raise ArchiveError(f"{label} could not be read: {exc}") from exc
    manifest = _check_manifest(label, manifest_bytes, seen)
    disk = work / DISK
    _check_disk(label, disk, manifest)
    return VerifiedArchive(manifest, disk)


def _check_manifest(label: str, body: bytes, seen: dict[str, tuple[int, str]]) -> dict[str, Any]:
    if not body:
        raise ArchiveError(f"{label} has no manifest.json: it is not a boxvm or BoxLite archive")
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise ArchiveError(f"{label}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArchiveError(f"{label}: manifest.json is not a JSON object")
    if "format" not in manifest and isinstance(manifest.get("image"), str):
        return _boxlite_manifest(label, manifest, seen)
    if manifest.get("format") != FORMAT:
        raise ArchiveError(f"{label}: manifest.json is not a {FORMAT} manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArchiveError(f"{label}: manifest version must be an integer")
    if version > VERSION:
        raise ArchiveError(f"{label} has archive version {version}; this boxvm reads up to {VERSION}: upgrade boxvm")
    members = manifest.get("members")
    checksum = manifest.get("container_disk_checksum")
    if not isinstance(members, dict) or not isinstance(checksum, str):
        raise ArchiveError(f"{label}: manifest lacks members or container_disk_checksum")
    if DISK not in seen:
        raise ArchiveError(f"{label} has no {DISK}")
    for name in seen.keys() - {MANIFEST}:
        if members.get(name) != seen[name][0]:
            raise ArchiveError(f"{label}: {name} has {seen[name][0]} bytes, the manifest says {members.get(name)}")
    if set(members) - set(seen):
        raise ArchiveError(f"{label}: members {sorted(set(members) - set(seen))} are missing")
    if checksum != seen[DISK][1]:
        raise ArchiveError(f"{label}: {DISK} does not match its checksum (corrupt or altered)")
    if not isinstance(manifest.get("disk_virtual_size"), int):
        raise ArchiveError(f"{label}: manifest lacks disk_virtual_size")
    return manifest


BOXLITE_VERSIONS = range(1, 6)


def _boxlite_manifest(label: str, manifest: dict[str, Any], seen: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """Normalise a BoxLite manifest (versions 1-5: no format field, checksums from v2,
    box options from v3) into ours, verifying what it carries."""
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in BOXLITE_VERSIONS:
        raise ArchiveError(f"{label}: BoxLite archive version {version!r} is not supported (1-5 are)")
    if DISK not in seen:
        raise ArchiveError(f"{label} has no {DISK}")
    checksum = manifest.get("container_disk_checksum")
    if version >= 2 and (not isinstance(checksum, str) or checksum != seen[DISK][1]):
        raise ArchiveError(f"{label}: {DISK} does not match its checksum (corrupt or altered)")
    raw_options = manifest.get("box_options")
    options: dict[str, Any] = {}
    if isinstance(raw_options, dict):  # only what means the same here; the rest is BoxLite's own
        for key in ("cpus", "memory_mib", "workdir", "user"):
            if isinstance(raw_options.get(key), int | str) and not isinstance(raw_options.get(key), bool):
                options[key] = raw_options[key]
    name = manifest.get("box_name")
    return {
        "format": "boxlite-archive",
        "version": version,
        "box_name": name if isinstance(name, str) else None,
        "image": manifest["image"],
        "container_disk_checksum": checksum if version >= 2 else "",
        "box_options": options,
        "disk_virtual_size": None,  # taken from the verified disk
        "members": {n: size for n, (size, _h) in seen.items() if n != MANIFEST},
    }


def _check_disk(label: str, disk: Path, manifest: dict[str, Any]) -> None:
    try:
        header = qcow2.read_header(disk)
        if header.backing_file is not None:
            raise ValueError(f"it references a backing file ({header.backing_file!r}), which could read host files")
        if header.data_file is not None or header.incompatible_features & qcow2.INCOMPAT_DATA_FILE:
            raise ValueError("it uses an external data file")
        if header.refcount_table_offset + header.refcount_table_clusters * qcow2.CLUSTER > disk.stat().st_size:
            raise ValueError("its refcount table points past the end of the file")
        if manifest["disk_virtual_size"] is None:  # BoxLite manifests do not record it
            manifest["disk_virtual_size"] = header.size
        elif header.size != manifest["disk_virtual_size"]:
            raise ValueError("its virtual size differs from the manifest")
        qcow2.allocation(disk)  # every table and data offset inside the file
    except (ValueError, OSError) as exc:
        raise ArchiveError(f"{label}: {DISK} is unsafe or malformed: {exc}") from exc
    check = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(disk)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ArchiveError(f"{label}: qemu-img check rejects {DISK}: {check.stdout.strip() or check.stderr.strip()}")
