"""A real OCI registry for tests (Debian's ``docker-registry``) and a minimal pusher.

Images are built here from bytes: the default image's root layer as a base (so boxes
booted from them have a shell), plus small layers with files and whiteouts, a config
with Env/WorkingDir/Cmd, and multi-platform indexes.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TokenIssuer:
    """Signs registry bearer tokens (JWT, RS256, the certificate in ``x5c``) the way a
    Docker token service does; the registry trusts its self-signed certificate."""

    def __init__(self, root: Path, service: str = "boxvm-test-registry") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.service, self.issuer = service, "boxvm-test-issuer"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "boxvm test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)

    def token(self, subject: str, access: list[dict[str, object]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "iat": now, "nbf": now - 60,
                  "exp": now + 600, "jti": os.urandom(8).hex(), "access": access}  # fmt: skip
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(signature)}"


@dataclass
class RegistryServer:
    root: Path
    user: str | None = None
    password: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    token_realm: str | None = None  # bearer-token auth through this token service
    issuer: TokenIssuer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def start(self) -> RegistryServer:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if self.issuer is not None:
            token = {"realm": self.token_realm, "service": self.issuer.service, "issuer": self.issuer.issuer}
            config["auth"] = {"token": {**token, "rootcertbundle": str(self.issuer.bundle)}}
        elif self.user:
            htpasswd = self.root / "htpasswd"
            hashed = bcrypt.hashpw((self.password or "").encode(), bcrypt.gensalt(rounds=5)).decode()
            htpasswd.write_text(f"{self.user}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "boxvm-test", "path": str(htpasswd)}}
        (self.root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(self.root / "config.yml")], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)

    def client(self, repo: str = "") -> httpx.Client:
        if self.issuer is not None:  # a push token for ``repo``, straight from the issuer
            token = self.issuer.token("pusher", [{"type": "repository", "name": repo, "actions": ["pull", "push"]}])
            return httpx.Client(base_url=f"http://{self.host}", headers={"Authorization": f"Bearer {token}"})
        auth = (self.user, self.password or "") if self.user else None
        return httpx.Client(base_url=f"http://{self.host}", auth=auth, timeout=60)

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.split(":")[1]
        return self.root / "storage" / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def blob_gets(self, digest: str) -> int:
        """How many times the registry served this blob (from its access log)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if "GET /v2/" in line and f'/blobs/{digest} HTTP/1.1" 200' in line)


def put_blob(http: httpx.Client, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
        return digest
    start = http.post(f"/v2/{repo}/blobs/uploads/")
    start.raise_for_status()
    location = start.headers["location"]
    sep = "&" if "?" in location else "?"
    http.put(f"{location}{sep}digest={digest}", content=data,
             headers={"content-type": "application/octet-stream"}).raise_for_status()  # fmt: skip
    return digest


def put_manifest(http: httpx.Client, repo: str, ref: str, manifest: dict[str, object]) -> tuple[str, int]:
    body = json.dumps(manifest).encode()
    r = http.put(f"/v2/{repo}/manifests/{ref}", content=body, headers={"content-type": str(manifest["mediaType"])})
    r.raise_for_status()
    return "sha256:" + hashlib.sha256(body).hexdigest(), len(body)


def layer(files: dict[str, bytes | None]) -> tuple[bytes, str]:
    """A gzip'd tar layer (None = a directory); returns it and its diff id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass
class Pushed:
    manifest_digest: str
    manifest_size: int
    layer_digests: list[str]


def push_image(
    http: httpx.Client,
    repo: str,
    tag: str,
    base: tuple[bytes, str, str] | None,
    layers: list[tuple[bytes, str]],
    env: list[str] | None = None,
    workdir: str = "/",
    arch: str = "amd64",
    cmd: list[str] | None = None,
) -> Pushed:
    """Push an image: ``base`` is (blob, diff id, media type) of a ready layer."""
    descs, diff_ids = [], []
    if base is not None:
        blob, diff_id, media_type = base
        descs.append({"mediaType": media_type, "digest": put_blob(http, repo, blob), "size": len(blob)})
        diff_ids.append(diff_id)
    for blob, diff_id in layers:
        descs.append({"mediaType": OCI_LAYER_GZ, "digest": put_blob(http, repo, blob), "size": len(blob)})
        diff_ids.append(diff_id)
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "WorkingDir": workdir, "Cmd": cmd or ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }  # fmt: skip
    cfg = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put_blob(http, repo, cfg), "size": len(cfg)},
        "layers": descs,
    }
    digest, size = put_manifest(http, repo, tag, manifest)
    return Pushed(digest, size, [d["digest"] for d in descs])


def push_index(http: httpx.Client, repo: str, tag: str, entries: list[tuple[Pushed, str]]) -> str:
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": p.manifest_digest, "size": p.manifest_size,
             "platform": {"os": "linux", "architecture": arch}}
            for p, arch in entries
        ],
    }  # fmt: skip
    return put_manifest(http, repo, tag, index)[0]


def stop_answering(server: RegistryServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def answer_again(server: RegistryServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)
