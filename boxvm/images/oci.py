"""OCI image layouts (a directory or a tar of one): read, verify, and merge layers.

Archives and layers are untrusted input. Layers are merged with our fd-contained
extractor (``boxvm.extract``) rather than a stock one because we need whiteouts and
opaque directories and must keep owners, setuid bits and device nodes (which the
stdlib's safe filters strip), while refusing anything that would escape the root:
absolute paths, ``..``, writes or hard links through a symlink, whiteouts of the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from boxvm import tarsafe
from boxvm.errors import ImageError
from boxvm.extract import LAYER, LAYOUT, Extractor, Parts, extract, split_name

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_TYPES = {
    OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str


@dataclass(frozen=True)
class Image:
    digest: str  # the manifest digest: the image's identity
    config: dict[str, Any]
    layers: list[Layer]
    layout: Path  # a directory holding blobs/sha256/...


def read_layout(path: Path, work: Path) -> Image:
    """Open an OCI layout directory, or unpack an OCI archive into ``work`` first."""
    if path.is_file():
        layout = work / "layout"
        layout.mkdir()
        try:
            with tarsafe.open_file(path) as tar, _dir_fd(layout) as root:
                extract(tar, root, LAYOUT)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImageError(f"{path} is not a readable OCI archive: {exc}") from exc
    elif path.is_dir():
        layout = path
    else:
        raise ImageError(f"image {str(path)!r} not found: give a local OCI layout directory or archive")
    if not (layout / "index.json").is_file():
        raise ImageError(f"{path} is not an OCI image layout (no index.json)")
    index = _json(layout / "index.json", path)
    desc = _pick(index.get("manifests") or [], path, layout)
    manifest = _json(_blob(layout, desc["digest"]), path)
    if manifest.get("mediaType", OCI_MANIFEST) not in MANIFEST_TYPES:
        raise ImageError(f"{path}: unsupported manifest type {manifest.get('mediaType')!r}")
    config = _json(_blob(layout, manifest["config"]["digest"]), path)
    layers = [Layer(item["digest"], item.get("mediaType", "")) for item in manifest.get("layers", [])]
    return Image(desc["digest"], config, layers, layout)


def _pick(manifests: list[dict[str, Any]], path: Path, layout: Path) -> dict[str, Any]:
    for desc in manifests:
        if desc.get("mediaType") in INDEX_TYPES:
            return _pick(_json(_blob(layout, desc["digest"]), path).get("manifests", []), path, layout)
        platform = desc.get("platform") or {}
        if platform.get("os", "linux") == "linux" and platform.get("architecture", "amd64") == "amd64":
            return desc
    raise ImageError(f"{path} holds no linux/amd64 image")


def _json(path: Path, origin: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ImageError(f"{origin}: unreadable {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ImageError(f"{origin}: {path.name} is not a JSON object")
    return data


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    path = layout / "blobs" / "sha256" / hexdigest
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise ImageError(f"blob {digest} is missing from the image layout") from exc
    if h.hexdigest() != hexdigest:
        raise ImageError(f"blob {digest} does not match its digest: the image is corrupt")
    return path


@contextmanager
def _layer_stream(path: Path, media_type: str) -> Iterator[IO[bytes]]:
    with path.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if media_type.endswith("+zstd") or magic == b"\x28\xb5\x2f\xfd":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                yield stream  # type: ignore[misc]
        elif magic[:2] == b"\x1f\x8b":
            import gzip

            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream  # type: ignore[misc]
        else:
            yield raw


def unpack(image: Image, dest: Path) -> None:
    """Merge the image's layers into ``dest`` (run under fakeroot when not root)."""
    dest.mkdir(parents=True, exist_ok=True)
    with _dir_fd(dest) as root:
        for layer in image.layers:
            path = _blob(image.layout, layer.digest)
            try:
                with _layer_stream(path, layer.media_type) as stream, tarsafe.open_stream(stream) as tar:
                    _apply_layer(tar, Extractor(root, LAYER))
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ImageError(f"layer {layer.digest[:19]} is unreadable: {exc}") from exc


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _apply_layer(tar: tarfile.TarFile, ex: Extractor) -> None:
    """One layer over the lower ones: whiteouts delete, opaque markers hide what lower
    layers put in a directory, anything else replaces what is at its path."""
    added: set[Parts] = set()
    for member, data in tarsafe.members(tar):
        parts = split_name(member.name, LAYER)
        base = parts[-1] if parts else ""
        if base == ".wh..wh..opq":
            with ex.directory(parts[:-1]) as fd:
                lower = [name for name in os.listdir(fd) if (*parts[:-1], name) not in added]
            for name in lower:
                ex.remove((*parts[:-1], name))
        elif base.startswith(".wh..wh."):
            continue  # other AUFS metadata (.wh..wh.plnk, ...): nothing to apply
        elif base.startswith(".wh."):
            hidden = base[4:]
            if hidden in ("", ".", ".."):
                raise ImageError(f"layer whiteout {member.name!r} names no entry (it would remove a parent)")
            ex.remove((*parts[:-1], hidden))
        else:
            link = split_name(member.linkname, LAYER) if member.islnk() else ()
            ex.add(member, data, parts, link)
            added.update(parts[:i] for i in range(1, len(parts) + 1))  # with the parents it made
    ex.finish()


def write_layout(rootfs_tar: Path, out: Path, config: dict[str, Any], ref: str) -> str:
    """Write a one-layer OCI layout; returns the manifest digest."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes | Path, media_type: str) -> dict[str, Any]:
        if isinstance(data, Path):
            h = hashlib.sha256()
            with data.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest, size = h.hexdigest(), data.stat().st_size
            data.rename(blobs / digest)
        else:
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
            (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": size}

    layer = put(rootfs_tar, "application/vnd.oci.image.layer.v1.tar")
    config = {**config, "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
    cfg = put(json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": [layer]}
    man = put(json.dumps(manifest, sort_keys=True).encode(), manifest["mediaType"])
    man["annotations"] = {"org.opencontainers.image.ref.name": ref}
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return man["digest"]
