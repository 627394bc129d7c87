"""Pulling images from OCI distribution registries into a verified, shared cache.

A pull resolves the reference to one linux/amd64 manifest (through an OCI index or a
Docker manifest list), downloads the config and layers in parallel into a blob cache
keyed by digest, verifying every byte against its digest and size before a blob is
kept, and assembles an OCI layout (hard links into the cache) that the rest of boxvm
reads like a local one. Interrupted downloads resume from ``blobs/partial``; nothing in
the cache or the layouts is ever unverified. Pulls of the same image (or blob) take a
file lock, so concurrent pulls, in any process, do the work once.

Written on httpx rather than a registry SDK: the Python ones either need a Docker
daemon or lack resumable, verified, parallel blob downloads.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from boxvm.errors import ImageError
from boxvm.images.oci import INDEX_TYPES, MANIFEST_TYPES, OCI_MANIFEST
from boxvm.images.reference import Reference
from boxvm.paths import Home
from boxvm.progress import Progress, silent

ACCEPT = ", ".join([*sorted(INDEX_TYPES), *sorted(MANIFEST_TYPES)])
MANIFEST_LIMIT = 4 << 20
PLATFORM = {"os": "linux", "architecture": "amd64"}
PARALLEL = 3
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def credentials_for(registry: str, given: Credentials | None = None) -> Credentials | None:
    """Explicit credentials, else ``BOXVM_REGISTRY_USERNAME``/``_PASSWORD``, else the
    Docker ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``) entry for the registry."""
    if given is not None:
        return given
    user, password = os.environ.get("BOXVM_REGISTRY_USERNAME"), os.environ.get("BOXVM_REGISTRY_PASSWORD")
    if user and password is not None:
        return Credentials(user, password)
    config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == "docker.io":
        keys.append("https://index.docker.io/v1/")
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return Credentials(user, password)
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


def plain_http_allowed(ref: Reference, insecure: bool) -> bool:
    """Plain HTTP only for loopback registries (as Docker allows) or ones marked insecure
    (``insecure=True`` or listed in ``BOXVM_INSECURE_REGISTRIES``)."""
    listed = {r.strip() for r in os.environ.get("BOXVM_INSECURE_REGISTRIES", "").split(",") if r.strip()}
    return insecure or ref.registry in listed or ref.hostname in ("localhost", "127.0.0.1", "::1")


class Registry:
    """One repository on one registry, with its authentication state."""

    def __init__(self, ref: Reference, creds: Credentials | None, insecure: bool, timeout: float = 30) -> None:
        self.ref = ref
        self.creds = creds
        scheme = "http" if plain_http_allowed(ref, insecure) else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self.http = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True)
        self.auth: str | None = None

    def close(self) -> None:
        self.http.close()

    @contextlib.contextmanager
    def get(self, url: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        """A streamed GET, authenticating as the registry's challenge asks (once)."""
        for attempt in range(2):
            request = self.http.build_request("GET", url, headers={**(headers or {}), **self._auth_header()})
            try:
                response = self.http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise ImageError(f"cannot reach registry {self.ref.registry}: {exc}") from exc
            if response.status_code == 401 and attempt == 0:
                challenge = response.headers.get("www-authenticate", "")
                response.close()
                self._authenticate(challenge)
                continue
            try:
                self._check(response)
                yield response
            finally:
                response.close()
            return

    def _auth_header(self) -> dict[str, str]:
        return {"Authorization": self.auth} if self.auth else {}

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        basic = None
        if self.creds is not None:
            basic = base64.b64encode(f"{self.creds.username}:{self.creds.password}".encode()).decode()
        needs = ImageError(
            f"registry {self.ref.registry} needs credentials: pass username/password, set "
            "BOXVM_REGISTRY_USERNAME/BOXVM_REGISTRY_PASSWORD or log in with docker"
        )
        if scheme.lower() == "basic":
            if basic is None:
                raise needs
            self.auth = f"Basic {basic}"
        elif scheme.lower() == "bearer" and "realm" in fields:
            query = {k: v for k, v in fields.items() if k in ("service", "scope")}
            query.setdefault("scope", f"repository:{self.ref.repository}:pull")
            headers = {"Authorization": f"Basic {basic}"} if basic else {}
            try:
                answer = self.http.get(fields["realm"], params=query, headers=headers)
            except httpx.HTTPError as exc:
                raise ImageError(f"cannot reach the token service of {self.ref.registry}: {exc}") from exc
            if answer.status_code in (401, 403):
                raise needs if basic is None else ImageError(f"registry {self.ref.registry} refused the credentials")
            try:
                body = answer.json()
                self.auth = f"Bearer {body.get('token') or body['access_token']}"
            except (ValueError, KeyError) as exc:
                raise ImageError(f"the token service of {self.ref.registry} gave no token") from exc
        else:
            raise ImageError(f"registry {self.ref.registry} asks for unsupported authentication {challenge!r}")

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            detail = response.json()["errors"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            detail = response.text[:200]
        if response.status_code == 401:
            raise ImageError(f"registry {self.ref.registry} refused the credentials for {self.ref.repository}")
        if response.status_code == 404:
            raise ImageError(f"image {self.ref} not found on {self.ref.registry}: check the name and tag ({detail})")
        raise ImageError(f"registry {self.ref.registry} answered {response.status_code}: {detail}")

    def manifest(self, wanted: str, digest: str | None = None) -> tuple[bytes, dict[str, Any]]:
        """A manifest or index by tag or digest; verified when its digest is known."""
        with self.get(f"{self.base}/manifests/{wanted}", {"Accept": ACCEPT}) as response:
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MANIFEST_LIMIT:
                    raise ImageError(f"{self.ref}: the manifest is larger than {MANIFEST_LIMIT} bytes")
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if digest is not None and _sha256(body) != digest:
            raise ImageError(f"{self.ref}: manifest {digest} does not match its digest: rejected")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ImageError(f"{self.ref}: the manifest is not JSON") from exc
        if not isinstance(data, dict):
            raise ImageError(f"{self.ref}: the manifest is not a JSON object")
        data.setdefault("mediaType", media_type)
        return body, data

    def blob(self, desc: dict[str, Any], cache: BlobCache, progress: Progress) -> Path:
        """The verified blob for ``desc``, downloaded (or resumed) unless cached."""
        digest, size = str(desc.get("digest")), desc.get("size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{self.ref}: descriptor {digest} has no valid size")
        with cache.locked(digest):
            final = cache.path(digest)
            if final.exists():
                return final
            partial = cache.partial(digest)
            have = partial.stat().st_size if partial.exists() else 0
            if have > size:
                partial.unlink()
                have = 0
            h = hashlib.sha256()
            if have:
                with partial.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
            with self.get(f"{self.base}/blobs/{digest}", headers) as response, partial.open("ab") as out:
                if have and response.status_code != 206:  # no range support: start over
                    out.truncate(0)
                    h, have = hashlib.sha256(), 0
                count = have
                try:
                    for chunk in response.iter_bytes(_CHUNK):
                        count += len(chunk)
                        if count > size:
                            raise ImageError(f"{self.ref}: blob {digest} is larger than its declared {size} bytes")
                        h.update(chunk)
                        out.write(chunk)
                except httpx.HTTPError as exc:
                    raise ImageError(
                        f"registry {self.ref.registry} stopped sending blob {digest[:19]} "
                        f"after {count} of {size} bytes ({exc}); pull again to resume"
                    ) from exc
                out.flush()
                os.fsync(out.fileno())
            if count != size:
                raise ImageError(f"{self.ref}: blob {digest[:19]} is truncated ({count} of {size} bytes); pull again")
            if f"sha256:{h.hexdigest()}" != digest:
                partial.unlink()
                raise ImageError(f"{self.ref}: blob {digest} does not match its digest: rejected, not cached")
            os.chmod(partial, 0o444)
            os.rename(partial, final)
            progress(f"pulled {digest[:19]} ({size / 1e6:.1f} MB)")
            return final


class BlobCache:
    """``images/blobs/sha256/<hex>``: verified blobs only; ``partial/`` for resumes."""

    def __init__(self, home: Home) -> None:
        self.root = home.images / "blobs"
        for sub in ("sha256", "partial", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _hex(digest: str) -> str:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ImageError(f"unsupported or malformed digest {digest!r}")
        return hexdigest

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / self._hex(digest)

    def partial(self, digest: str) -> Path:
        return self.root / "partial" / self._hex(digest)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        with open(self.root / "locks" / self._hex(name), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def prune(self) -> int:
        """Delete cached blobs no layout links to any more; returns bytes freed."""
        freed = 0
        for blob in (self.root / "sha256").iterdir():
            st = blob.stat()
            if st.st_nlink == 1:
                freed += st.st_size
                blob.unlink()
        return freed


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _platform_manifest(reg: Registry, index: dict[str, Any]) -> dict[str, Any]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"{reg.ref}: the index lists no manifests")
    for desc in manifests:
        platform = desc.get("platform") or {}
        if all(platform.get(k) == v for k, v in PLATFORM.items()):
            return dict(desc)
    platforms = [d.get("platform") or {} for d in manifests]
    offered = sorted({f"{p.get('os')}/{p.get('architecture')}" for p in platforms})
    raise ImageError(f"image {reg.ref} has no linux/amd64 variant (it offers {', '.join(offered) or 'none'})")


def pull(
    ref: Reference,
    home: Home,
    creds: Credentials | None = None,
    insecure: bool = False,
    progress: Progress = silent,
) -> Path:
    """Pull ``ref`` into the cache; returns its OCI layout directory."""
    timeout = float(os.environ.get("BOXVM_REGISTRY_TIMEOUT", 30))  # seconds without progress
    reg = Registry(ref, credentials_for(ref.registry, creds), insecure, timeout)
    cache = BlobCache(home)
    try:
        body, manifest = reg.manifest(ref.wanted, ref.digest)
        digest = ref.digest or _sha256(body)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            desc = _platform_manifest(reg, manifest)
            digest = str(desc["digest"])
            body, manifest = reg.manifest(digest, digest)
        if manifest.get("mediaType", OCI_MANIFEST) not in MANIFEST_TYPES:
            raise ImageError(f"{ref}: unsupported manifest type {manifest.get('mediaType')!r}")
        layout = home.images / "layouts" / BlobCache._hex(digest)
        with cache.locked(digest):
            if (layout / "index.json").exists():
                return layout
            descs = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
            progress(f"pulling {ref} ({len(descs) - 1} layers)")
            with ThreadPoolExecutor(PARALLEL) as pool:
                blobs = list(pool.map(lambda d: reg.blob(d, cache, progress), descs))
            with home.staging("pull-") as work:
                (work / "blobs" / "sha256").mkdir(parents=True)
                for blob in blobs:
                    os.link(blob, work / "blobs" / "sha256" / blob.name)
                (work / "blobs" / "sha256" / BlobCache._hex(digest)).write_bytes(body)
                entry = {"mediaType": manifest.get("mediaType", OCI_MANIFEST), "digest": digest, "size": len(body)}
                entry["annotations"] = {"org.opencontainers.image.ref.name": str(ref)}
                (work / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
                (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
                layout.parent.mkdir(parents=True, exist_ok=True)
                work.rename(layout)
            return layout
    finally:
        reg.close()


def remove_layout(home: Home, digest: str) -> None:
    shutil.rmtree(home.images / "layouts" / BlobCache._hex(digest), ignore_errors=True)
    BlobCache(home).prune()
