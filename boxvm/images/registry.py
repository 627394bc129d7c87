"""Pulling images from OCI distribution registries into a verified, shared cache.

A pull resolves the reference to one linux/amd64 manifest (through an OCI index or a
Docker manifest list), downloads the config and layers in parallel into a blob cache
keyed by digest, verifying every byte against its digest and size before a blob is
kept, and assembles an OCI layout (hard links into the cache) that the rest of boxvm
reads like a local one. Interrupted downloads resume from ``blobs/partial``; nothing in
the cache or the layouts is ever unverified. Pulls of the same image (or blob) take a
file lock, so concurrent pulls, in any process, do the work once.

A registry is hostile until its bytes verify: every document is read with a size and a
time limit, blobs may not exceed their descriptors, error bodies are never echoed, and
credentials go only to the registry they are filed under (or its HTTPS token service).
Pulls for a REST caller (``for_remote_caller``) get nothing of the server's: not its
credentials, not plain HTTP unless the operator marked the registry insecure, and no
loopback or private address unless the operator listed the registry.

Written on httpx rather than a registry SDK: the Python ones either need a Docker
daemon or lack resumable, verified, parallel blob downloads.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx

from boxvm.errors import ImageError
from boxvm.images.oci import INDEX_TYPES, MANIFEST_TYPES, OCI_MANIFEST
from boxvm.images.reference import Reference, registry_key
from boxvm.paths import Home
from boxvm.progress import Progress, silent

ACCEPT = ", ".join([*sorted(INDEX_TYPES), *sorted(MANIFEST_TYPES)])
MANIFEST_LIMIT = 4 << 20  # a manifest or index (containerd's limit too)
CONFIG_LIMIT = 8 << 20  # the image config blob
TOKEN_LIMIT = 1 << 20  # a token service's answer
ERROR_LIMIT = 64 << 10  # what is read of an error body, to find its code
MAX_LAYERS = 128
IMAGE_LIMIT = 64 << 30  # the sum of the config and layer sizes a manifest declares
MIN_RATE = 64 << 10  # bytes/s a blob download must average after its first `timeout` seconds
PLATFORM = {"os": "linux", "architecture": "amd64"}
PARALLEL = 3
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# The distribution spec's error codes: the only part of an error body a message repeats.
ERROR_CODES = frozenset({
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED",
    "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
})  # fmt: skip
_CHUNK = 1 << 20
_REMOTE: ContextVar[bool] = ContextVar("boxvm_registry_remote_caller", default=False)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@contextlib.contextmanager
def for_remote_caller() -> Iterator[None]:
    """Pulls started inside (also in threads of ``asyncio.to_thread``, which copies the
    context) act for an untrusted REST caller: only the caller's own credentials, plain
    HTTP only to registries in the server's ``BOXVM_INSECURE_REGISTRIES``, and no
    loopback, private or link-local address unless the registry (or token service, or
    redirect target) is listed in the server's ``BOXVM_REST_REGISTRIES``."""
    token = _REMOTE.set(True)
    try:
        yield
    finally:
        _REMOTE.reset(token)


def _listed(var: str) -> set[str]:
    return {registry_key(r) for r in os.environ.get(var, "").split(",") if r.strip()}


def credentials_for(registry: str, given: Credentials | None = None, remote: bool = False) -> Credentials | None:
    """Credentials for ``registry``: the ones given with the pull, else (never for a REST
    caller) ``BOXVM_REGISTRY_USERNAME``/``_PASSWORD`` if ``BOXVM_REGISTRY_HOST`` names this
    registry, else its entry in Docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``).
    Hosts compare as whole ``host[:port]`` keys, Docker Hub's names as one."""
    if given is not None or remote:
        return given
    key = registry_key(registry)
    user, password = os.environ.get("BOXVM_REGISTRY_USERNAME"), os.environ.get("BOXVM_REGISTRY_PASSWORD")
    if user and password is not None and registry_key(os.environ.get("BOXVM_REGISTRY_HOST", "")) == key:
        return Credentials(user, password)
    config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(auths, dict):
        return None
    for name, entry in auths.items():
        if registry_key(str(name)) != key or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
                if sep:
                    return Credentials(user, password)
        if isinstance(entry.get("username"), str) and entry["username"]:
            return Credentials(entry["username"], str(entry.get("password", "")))
    return None


def plain_http_allowed(ref: Reference, insecure: bool) -> bool:
    """Plain HTTP only for loopback registries (as Docker allows) or ones marked insecure
    (``insecure=True`` or listed in ``BOXVM_INSECURE_REGISTRIES``)."""
    return insecure or ref.key in _listed("BOXVM_INSECURE_REGISTRIES") or ref.hostname.lower() in LOOPBACK


def _host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address, split."""
    if entry.startswith("["):
        host, _, port = entry[1:].partition("]")
        port = port.removeprefix(":")
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, ""
    return host, int(port) if port.isdigit() else None


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PublicOnly(httpcore.NetworkBackend):
    """Dials only public addresses, except hosts the operator listed. The check is on
    the address actually dialled (resolved here, then connected to by number), so DNS
    rebinding cannot swap in a private one, and it covers token services and redirects."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = {_host_port(a) for a in allowed}
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        name = host.lower().strip("[]")
        if (name, port) not in self.allowed and (name, None) not in self.allowed:
            try:
                infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {name}") from exc
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if not addresses or not all(_public(a) for a in addresses):
                raise ImageError(
                    f"{name}:{port} is a loopback, private or link-local address: over REST a registry there is "
                    "used only if the server's operator lists it in BOXVM_REST_REGISTRIES"
                )
            for address in addresses[:-1]:  # each checked address in turn, as create_connection would
                with contextlib.suppress(httpcore.ConnectError, httpcore.ConnectTimeout):
                    return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            host = addresses[-1]
        return self.inner.connect_tcp(host, port, timeout, local_address, socket_options)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("no unix sockets for registry pulls")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def _transport(remote: bool) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(trust_env=not remote)
    if remote:
        # httpx has no public hook for the network backend: the pool it builds is replaced
        # by the same kind of pool with the guard.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),  # the operator's CA settings still apply
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_PublicOnly(_listed("BOXVM_REST_REGISTRIES")),
        )
    return transport


def _failure(exc: Exception) -> str:
    """What went wrong, in fixed words: httpx's messages can quote the server's bytes."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return f"transport error ({type(exc).__name__})"


def _read(response: httpx.Response, limit: int, deadline: float, what: str) -> bytes:
    """The body, refused (before it is read, when the length is declared) past ``limit``
    bytes or ``deadline`` (time.monotonic())."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageError(f"{what} is larger than {limit} bytes: refused")
    body = bytearray()
    for chunk in response.iter_raw():  # as it arrives: a chunker would wait for a full chunk
        body += chunk
        if len(body) > limit:
            raise ImageError(f"{what} is larger than {limit} bytes: refused")
        if time.monotonic() > deadline:
            raise ImageError(f"{what} took too long to arrive: refused")
    return bytes(body)


class Registry:
    """One repository on one registry, with its authentication state."""

    def __init__(
        self, ref: Reference, creds: Credentials | None, insecure: bool, timeout: float = 30, remote: bool = False
    ) -> None:
        self.ref = ref
        self.creds = creds
        self.remote = remote
        self.timeout = timeout
        self.plain = plain_http_allowed(ref, insecure)
        self.base = f"{'http' if self.plain else 'https'}://{ref.api_host}/v2/{ref.repository}"
        # identity: a compressed answer could expand past every limit in one read
        self.http = httpx.Client(
            transport=_transport(remote),
            timeout=httpx.Timeout(timeout),
            follow_redirects=True,  # httpx drops Authorization when a redirect leaves the origin
            headers={"Accept-Encoding": "identity"},
            trust_env=not remote,  # no proxy (it would dial for us, unchecked) for REST callers
        )
        self.auth: str | None = None

    def close(self) -> None:
        self.http.close()

    @contextlib.contextmanager
    def _open(
        self, url: str | httpx.URL, headers: dict[str, str], what: str, **params: str
    ) -> Iterator[httpx.Response]:
        try:
            with self.http.stream("GET", url, headers=headers, params=params or None) as response:
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise ImageError(f"{what} {self.ref.registry} sent a content-encoded answer: refused")
                yield response
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot reach {what} {self.ref.registry}: {_failure(exc)}") from exc

    @contextlib.contextmanager
    def get(self, url: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        """A streamed GET, authenticating as the registry's challenge asks (once)."""
        for attempt in range(2):
            auth = {"Authorization": self.auth} if self.auth else {}
            with self._open(url, {**(headers or {}), **auth}, "registry") as response:
                if response.status_code == 401 and attempt == 0:
                    challenge = response.headers.get("www-authenticate", "")
                else:
                    self._check(response)
                    yield response
                    return
            self._authenticate(challenge)

    def _needs(self) -> ImageError:
        where = "pass username/password with the pull"
        if not self.remote:
            where += ", set BOXVM_REGISTRY_HOST/_USERNAME/_PASSWORD or log in with docker"
            if os.environ.get("BOXVM_REGISTRY_USERNAME") and not os.environ.get("BOXVM_REGISTRY_HOST"):
                where += " (BOXVM_REGISTRY_USERNAME is set, but only for the registry BOXVM_REGISTRY_HOST names)"
        return ImageError(f"registry {self.ref.registry} needs credentials: {where}")

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        basic = None
        if self.creds is not None:
            basic = base64.b64encode(f"{self.creds.username}:{self.creds.password}".encode()).decode()
        if scheme.lower() == "basic":
            if basic is None:
                raise self._needs()
            self.auth = f"Basic {basic}"
        elif scheme.lower() == "bearer" and "realm" in fields:
            realm = self._realm(fields["realm"], basic is not None)
            query = {k: v for k, v in fields.items() if k in ("service", "scope")}
            query.setdefault("scope", f"repository:{self.ref.repository}:pull")
            headers = {"Authorization": f"Basic {basic}"} if basic else {}
            deadline = time.monotonic() + self.timeout
            with self._open(realm, headers, "the token service of", **query) as answer:
                if answer.status_code in (401, 403):
                    raise self._needs() if basic is None else self._refused()
                try:
                    body = json.loads(_read(answer, TOKEN_LIMIT, deadline, "the token service's answer"))
                    token = body.get("token") or body["access_token"]
                except (ValueError, KeyError, AttributeError) as exc:
                    raise ImageError(f"the token service of {self.ref.registry} gave no token") from exc
            if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]{1,16384}", token):
                raise ImageError(f"the token service of {self.ref.registry} gave no usable token")
            self.auth = f"Bearer {token}"
        else:
            shown = scheme if re.fullmatch(r"[A-Za-z-]{1,20}", scheme) else "?"
            raise ImageError(f"registry {self.ref.registry} asks for unsupported authentication ({shown})")

    def _realm(self, realm: str, with_credentials: bool) -> httpx.URL:
        """The token service's URL, if it may be used: HTTPS, or plain HTTP when the registry
        itself is plain-HTTP (loopback or marked insecure), and then credentials go in
        cleartext only to the registry's own host:port or a host marked insecure."""
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise ImageError(f"registry {self.ref.registry} names an invalid token service") from exc
        if url.scheme not in ("https", "http") or not url.host:
            raise ImageError(f"registry {self.ref.registry} names an invalid token service")
        if url.scheme == "https":
            return url
        if not self.plain:
            raise ImageError(
                f"registry {self.ref.registry} names a plain-HTTP token service: refused (a token service must use "
                "HTTPS unless the registry itself is loopback or marked insecure)"
            )
        base = httpx.URL(self.base)
        origin = (url.host, url.port or 80)
        same = origin == (base.host, base.port or 80)
        realm_host = f"[{url.host}]" if ":" in url.host else url.host
        realm_key = registry_key(f"{realm_host}:{origin[1]}")
        if with_credentials and not same and realm_key not in _listed("BOXVM_INSECURE_REGISTRIES"):
            raise ImageError(
                f"registry {self.ref.registry} sends credentials to a token service on another host "
                f"({realm_key}) over plain HTTP: refused, nothing was sent. Serve the token service over HTTPS, "
                "or list it in BOXVM_INSECURE_REGISTRIES"
            )
        return url

    def _refused(self) -> ImageError:
        return ImageError(f"registry {self.ref.registry} refused the credentials for {self.ref.repository}")

    def _check(self, response: httpx.Response) -> None:
        """Errors by status and, at most, the registry's error code from a known set: the
        body itself is never repeated (it could be any service's answer)."""
        if response.status_code < 400:
            return
        code = None
        with contextlib.suppress(ImageError, httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            body = json.loads(_read(response, ERROR_LIMIT, time.monotonic() + 5, "error"))
            code = body["errors"][0]["code"] if body["errors"][0]["code"] in ERROR_CODES else None
        detail = f" ({code})" if code else ""
        if response.status_code == 401:
            raise self._refused()
        if response.status_code == 404:
            raise ImageError(f"image {self.ref} not found on {self.ref.registry}: check the name and tag{detail}")
        raise ImageError(f"registry {self.ref.registry} answered HTTP {response.status_code}{detail}: try again later")

    def manifest(self, wanted: str, digest: str | None = None) -> tuple[bytes, dict[str, Any]]:
        """A manifest or index by tag or digest; verified when its digest is known."""
        deadline = time.monotonic() + self.timeout
        with self.get(f"{self.base}/manifests/{wanted}", {"Accept": ACCEPT}) as response:
            body = _read(response, MANIFEST_LIMIT, deadline, f"{self.ref}: the manifest")
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

    def blob(self, digest: str, size: int, cache: BlobCache, into: Path, progress: Progress) -> None:
        """Link the verified blob into ``into``, downloading (or resuming) it unless cached.
        The link is made under the blob's lock, so a concurrent prune cannot take it."""
        with cache.locked(digest):
            final = cache.path(digest)
            if not final.exists():
                self._download(digest, size, cache, progress)
            os.link(final, into / final.name)

    def _download(self, digest: str, size: int, cache: BlobCache, progress: Progress) -> None:
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
        deadline = time.monotonic() + self.timeout + size / MIN_RATE
        with self.get(f"{self.base}/blobs/{digest}", headers) as response, partial.open("ab") as out:
            if have and response.status_code != 206:  # no range support: start over
                out.truncate(0)
                h, have = hashlib.sha256(), 0
            count = have
            try:
                for chunk in response.iter_raw():
                    count += len(chunk)
                    if count > size:
                        raise ImageError(f"{self.ref}: blob {digest} is larger than its declared {size} bytes")
                    if time.monotonic() > deadline:
                        raise ImageError(f"registry {self.ref.registry} sends blob {digest[:19]} too slowly: stopped")
                    h.update(chunk)
                    out.write(chunk)
            except httpx.HTTPError as exc:
                raise ImageError(
                    f"registry {self.ref.registry} stopped sending blob {digest[:19]} "
                    f"after {count} of {size} bytes ({_failure(exc)}); pull again to resume"
                ) from exc
            out.flush()
            os.fsync(out.fileno())
        if count != size:
            raise ImageError(f"{self.ref}: blob {digest[:19]} is truncated ({count} of {size} bytes); pull again")
        if f"sha256:{h.hexdigest()}" != digest:
            partial.unlink()
            raise ImageError(f"{self.ref}: blob {digest} does not match its digest: rejected, not cached")
        os.chmod(partial, 0o444)
        os.rename(partial, cache.path(digest))
        progress(f"pulled {digest[:19]} ({size / 1e6:.1f} MB)")


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
            raise ImageError("unsupported or malformed digest (only sha256:<64 hex digits>)")
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
        """Delete cached blobs no layout links to any more; returns bytes freed. Each is
        judged under its lock: pulls link blobs while holding it."""
        freed = 0
        for blob in (self.root / "sha256").iterdir():
            if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
                continue
            with self.locked(f"sha256:{blob.name}"), contextlib.suppress(FileNotFoundError):
                st = blob.stat()
                if st.st_nlink == 1:
                    blob.unlink()
                    freed += st.st_size
        return freed


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _descriptor(ref: Reference, desc: object, limit: int) -> tuple[str, int]:
    """(digest, size) of a descriptor, checked before anything is fetched for it."""
    if not isinstance(desc, dict):
        raise ImageError(f"{ref}: the manifest has a malformed descriptor")
    digest, size = desc.get("digest"), desc.get("size")
    BlobCache._hex(str(digest))
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
        raise ImageError(f"{ref}: descriptor {str(digest)[:19]} has no valid size (at most {limit} bytes)")
    return str(digest), size


def _platform_manifest(ref: Reference, index: dict[str, Any]) -> str:
    """The digest of the linux/amd64 manifest an index lists."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"{ref}: the index lists no manifests")
    platforms = [(d, d.get("platform")) for d in manifests if isinstance(d, dict)]
    platforms = [(d, p) for d, p in platforms if isinstance(p, dict)]
    for desc, platform in platforms:
        if all(platform.get(k) == v for k, v in PLATFORM.items()):
            return _descriptor(ref, desc, MANIFEST_LIMIT)[0]
    offered = {f"{p.get('os')}/{p.get('architecture')}" for _, p in platforms}
    shown = sorted(o for o in offered if re.fullmatch(r"[a-z0-9._-]{1,32}/[a-z0-9._-]{1,32}", o))[:20]
    raise ImageError(f"image {ref} has no linux/amd64 variant (it offers {', '.join(shown) or 'none'})")


def pull(
    ref: Reference,
    home: Home,
    creds: Credentials | None = None,
    insecure: bool = False,
    progress: Progress = silent,
) -> Path:
    """Pull ``ref`` into the cache; returns its OCI layout directory. Inside
    ``for_remote_caller`` the server's own settings are not lent to the caller."""
    remote = _REMOTE.get()
    if remote and insecure and ref.key not in _listed("BOXVM_INSECURE_REGISTRIES"):
        raise ImageError(
            f"plain HTTP to registry {ref.registry} is refused over REST: the server's operator must list it "
            "in BOXVM_INSECURE_REGISTRIES"
        )
    timeout = float(os.environ.get("BOXVM_REGISTRY_TIMEOUT", 30))  # seconds without progress
    reg = Registry(ref, credentials_for(ref.registry, creds, remote), insecure and not remote, timeout, remote)
    cache = BlobCache(home)
    try:
        body, manifest = reg.manifest(ref.wanted, ref.digest)
        digest = ref.digest or _sha256(body)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            digest = _platform_manifest(ref, manifest)
            body, manifest = reg.manifest(digest, digest)
        media_type = manifest.get("mediaType", OCI_MANIFEST)
        if media_type not in MANIFEST_TYPES:
            raise ImageError(f"{ref}: unsupported manifest type (not an OCI or Docker v2 image manifest)")
        layers = manifest.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise ImageError(f"{ref}: the manifest must list at most {MAX_LAYERS} layers")
        blobs = [_descriptor(ref, manifest.get("config"), CONFIG_LIMIT)]
        blobs += [_descriptor(ref, d, IMAGE_LIMIT) for d in layers]
        if sum(size for _, size in blobs) > IMAGE_LIMIT:
            raise ImageError(f"{ref}: the image is larger than {IMAGE_LIMIT >> 30} GiB: refused")
        layout = home.images / "layouts" / BlobCache._hex(digest)
        with cache.locked(digest):
            if (layout / "index.json").exists():
                return layout
            progress(f"pulling {ref} ({len(layers)} layers)")
            with home.staging("pull-") as work:
                into = work / "blobs" / "sha256"
                into.mkdir(parents=True)
                with ThreadPoolExecutor(PARALLEL) as pool:
                    for done in [pool.submit(reg.blob, d, s, cache, into, progress) for d, s in dict(blobs).items()]:
                        done.result()
                (into / BlobCache._hex(digest)).write_bytes(body)
                entry = {"mediaType": media_type, "digest": digest, "size": len(body)}
                entry["annotations"] = {"org.opencontainers.image.ref.name": str(ref)}
                (work / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
                (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
                layout.parent.mkdir(parents=True, exist_ok=True)
                work.rename(layout)
            return layout
    finally:
        reg.close()


def remove_layout(home: Home, digest: str) -> None:
    cache = BlobCache(home)
    with cache.locked(digest):  # not while a pull of the same image assembles or returns it
        shutil.rmtree(home.images / "layouts" / BlobCache._hex(digest), ignore_errors=True)
    cache.prune()
