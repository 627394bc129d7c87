"""Image references with Docker's conventions.

``alpine`` is ``docker.io/library/alpine:latest``; the first component is a registry
only if it has a ``.`` or a ``:`` (a port) or is ``localhost``; ``@sha256:...`` pins a
digest (a tag may precede it and is then informational). Grammar from the distribution
project's reference package: lowercase path components joined by ``.``, ``_``, ``__`` or
dashes; tags of up to 128 word characters, dots and dashes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from boxvm.errors import ImageError

DEFAULT_REGISTRY = "docker.io"
REGISTRY_API_HOST = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"^\w[\w.-]{0,127}\Z")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?\Z")


@dataclass(frozen=True)
class Reference:
    registry: str  # as written (docker.io for Docker Hub)
    repository: str  # library/alpine
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """Where the registry's API really lives (Docker Hub's differs from its name)."""
        return REGISTRY_API_HOST.get(self.registry, self.registry)

    @property
    def hostname(self) -> str:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.endswith("]") else self.registry
        return host.strip("[]")

    @property
    def key(self) -> str:
        """The name credentials and settings for this registry are filed under."""
        return registry_key(self.registry)

    @property
    def wanted(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def registry_key(name: str) -> str:
    """``name`` (a registry as written, a ``config.json`` key such as
    ``https://index.docker.io/v1/``, an env setting) reduced to lowercase ``host[:port]``:
    scheme and path dropped, Docker Hub's names all ``docker.io``. Settings match on
    equality of keys only, so ``example.com`` never matches ``example.com.evil``."""
    host = name.strip().lower()
    host = host.split("://", 1)[1] if "://" in host else host
    host = host.split("/", 1)[0]
    return "docker.io" if host in DOCKER_HUB_NAMES else host


def looks_like_reference(text: str) -> bool:
    """A registry reference rather than a host path (paths start with / . ~ or exist)."""
    return bool(text) and not text.startswith(("/", ".", "~"))


def parse(text: str) -> Reference:
    """Parse ``text`` or raise ImageError saying what is wrong with it."""
    if not text or len(text) > 4096 or text != text.strip():
        raise ImageError(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise ImageError(f"invalid image reference {text!r}: the digest must be sha256:<64 hex digits>")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ImageError(f"invalid image reference {text!r}: bad tag {tag!r}")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise ImageError(f"invalid image reference {text!r}: bad registry host {first!r}")
        registry, path = first, remainder
    else:
        registry, path = DEFAULT_REGISTRY, rest
    if registry in ("docker.io", "index.docker.io") and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
        raise ImageError(
            f"invalid image reference {text!r}: repository names are lowercase letters, digits and separators"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)
