"""A hostile registry, token service or redirect target against boxvm's registry client.

The attacker's servers (``tests/fakehttp.py``) answer what an attacker would and record
every ``Authorization`` header they receive. Pulls go through the public API (local runtime, and a real
``boxvm serve`` for the REST cases).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import boxvm
from boxvm.paths import Home
from tests.fakehttp import Fake, Handler, Route, fakes, reply
from tests.helpers import rss_mib, serving
from tests.registry import OCI_CONFIG, OCI_LAYER_GZ, OCI_MANIFEST, layer

USER, PASSWORD = "tester", "s3cret-" + "x" * 8
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRET = "internal-secret-7f3a9c"


def endless(h: Handler, status: int, headers: dict[str, str] | None = None, chunk: bytes = b" " * (1 << 20)) -> None:
    """An answer with no length that never ends (HTTP/1.0: the body runs until close)."""
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    for _ in range(1024):  # 1 GiB at most, if nobody stops reading
        h.wfile.write(chunk)


def basic_challenge(fake: Fake, h: Handler) -> None:
    reply(h, 401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})


@dataclass
class Image:
    """A tiny valid image a fake registry can serve: manifest, config and one layer."""

    blobs: dict[str, bytes]
    manifest: bytes

    @staticmethod
    def make() -> Image:
        blob, diff_id = layer({"hello.txt": time.time_ns().to_bytes(8, "big")})  # unique: the cache outlives runs
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()  # fmt: skip
        blobs = {sha(config): config, sha(blob): blob}
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
                    "layers": [{"mediaType": OCI_LAYER_GZ, "digest": sha(blob), "size": len(blob)}]}  # fmt: skip
        return Image(blobs, json.dumps(manifest).encode())

    def serve(self, h: Handler) -> None:
        if "/manifests/" in h.path:
            reply(h, 200, self.manifest, {"Content-Type": OCI_MANIFEST})
        else:
            reply(h, 200, self.blobs[h.path.rsplit("/", 1)[1]])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    for var in ("BOXVM_REGISTRY_HOST", "BOXVM_REGISTRY_USERNAME", "BOXVM_REGISTRY_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def env_credentials(monkeypatch: pytest.MonkeyPatch, host: str | None) -> None:
    monkeypatch.setenv("BOXVM_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("BOXVM_REGISTRY_PASSWORD", PASSWORD)
    if host is not None:
        monkeypatch.setenv("BOXVM_REGISTRY_HOST", host)


# -- credentials bound to their registry ---------------------------------------------------
async def test_env_and_docker_config_credentials_go_only_to_their_registry(
    rt: boxvm.Runtime, no_docker_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fakes(basic_challenge, basic_challenge) as (a, b):
        env_credentials(monkeypatch, f"http://{a.host}/")  # written as in docker login: same key
        with pytest.raises(boxvm.ImageError, match="needs credentials"):
            await rt.images.pull(f"{b.host}/app:v1")
        assert b.authorizations() == []
        with pytest.raises(boxvm.ImageError, match="refused the credentials"):
            await rt.images.pull(f"{a.host}/app:v1")
        assert a.authorizations() == [BASIC]
        # unbound env credentials (the old way) go nowhere, and the error says why
        monkeypatch.delenv("BOXVM_REGISTRY_HOST")
        with pytest.raises(boxvm.ImageError, match="only for the registry BOXVM_REGISTRY_HOST names"):
            await rt.images.pull(f"{b.host}/app:v1")
        assert b.authorizations() == []
        # config.json: keys are compared whole, never as prefixes or suffixes of each other
        monkeypatch.delenv("BOXVM_REGISTRY_USERNAME")
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        near = [f"{b.host}0", f"{b.host[:-1]}", f"x{b.host}", f"https://{b.host}.evil/", "docker.io"]
        (no_docker_config / "config.json").write_text(json.dumps({"auths": {k: {"auth": auth} for k in near}}))
        with pytest.raises(boxvm.ImageError, match="needs credentials"):
            await rt.images.pull(f"{b.host}/app:v1")
        assert b.authorizations() == []


def test_registry_keys() -> None:
    from boxvm.images.reference import parse, registry_key

    names = ("https://index.docker.io/v1/", "docker.io", "registry-1.docker.io", "INDEX.docker.io")
    hub = {registry_key(k) for k in names}
    assert hub == {"docker.io"} == {parse("alpine").key}
    assert registry_key("http://127.0.0.1:5000/") == parse("127.0.0.1:5000/a").key == "127.0.0.1:5000"
    assert registry_key("example.com") != registry_key("example.com:443")


# -- the token service -------------------------------------------------------------------
def bearer(realm: str) -> Route:
    def route(fake: Fake, h: Handler) -> None:
        reply(h, 401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'})

    return route


def token_service(fake: Fake, h: Handler) -> None:
    reply(h, 401, b'{"details": "who are you"}')


async def test_credentials_never_go_in_cleartext_to_a_realm_on_another_port(
    rt: boxvm.Runtime, no_docker_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fakes(token_service) as (realm,), fakes(bearer(f"http://{realm.host}/token")) as (reg,):
        with pytest.raises(boxvm.ImageError, match=r"another host .* over plain HTTP: refused, nothing was sent"):
            await rt.images.pull(f"{reg.host}/app:v1", username=USER, password=PASSWORD)
        env_credentials(monkeypatch, reg.host)
        with pytest.raises(boxvm.ImageError, match="another host"):
            await rt.images.pull(f"{reg.host}/app:v1")
        assert realm.seen == []  # not even contacted
        monkeypatch.delenv("BOXVM_REGISTRY_HOST")
        with pytest.raises(boxvm.ImageError, match="needs credentials"):  # anonymous: allowed, and refused there
            await rt.images.pull(f"{reg.host}/app:v1")
        assert len(realm.seen) == 1 and realm.authorizations() == []
        # the operator marks the token service insecure: then it gets them
        monkeypatch.setenv("BOXVM_INSECURE_REGISTRIES", realm.host)
        with pytest.raises(boxvm.ImageError, match="refused the credentials"):
            await rt.images.pull(f"{reg.host}/app:v1", username=USER, password=PASSWORD)
        assert realm.authorizations() == [BASIC]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.2 (loopback, but not a name boxvm treats as one, so the
    registry there is HTTPS-only) and the CA file that trusts it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.2")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.2"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    root = tmp_path_factory.mktemp("tls")
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(root / "cert.pem", root / "key.pem")
    return ctx, root / "cert.pem"


async def test_an_https_registry_may_not_name_a_plain_http_realm(
    rt: boxvm.Runtime, no_docker_config: Path, monkeypatch: pytest.MonkeyPatch, tls: tuple[ssl.SSLContext, Path]
) -> None:
    context, ca = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with fakes(token_service, bind="127.0.0.2") as (realm,):
        with fakes(bearer(f"http://{realm.host}/token"), bind="127.0.0.2", tls=context) as (reg,):
            for creds in ({"username": USER, "password": PASSWORD}, {}):
                with pytest.raises(boxvm.ImageError, match="plain-HTTP token service: refused"):
                    await rt.images.pull(f"{reg.host}/app:v1", **creds)
            assert len(reg.seen) == 2  # it was reached over HTTPS
        assert realm.seen == []


# -- what a registry's answers may carry back ---------------------------------------------
def secret_error(status: int) -> Route:
    def route(fake: Fake, h: Handler) -> None:
        body = {"errors": [{"code": "MANIFEST_UNKNOWN" if status == 404 else SECRET, "message": SECRET}]}
        reply(h, status, json.dumps(body).encode(), {"Content-Type": "application/json"})

    return route


def plain_secret(fake: Fake, h: Handler) -> None:
    reply(h, 500, f"root:{SECRET}:0:0\n".encode() * 20)


def not_http(fake: Fake, h: Handler) -> None:
    h.wfile.write(f"SSH-2.0-{SECRET}\r\n".encode())


async def test_error_bodies_are_not_echoed(rt: boxvm.Runtime, no_docker_config: Path) -> None:
    with fakes(secret_error(500), secret_error(404), plain_secret, not_http) as (five, four, text, banner):
        for fake, expected in ((five, "answered HTTP 500: "), (four, r"not found .*\(MANIFEST_UNKNOWN\)"),
                               (text, "answered HTTP 500"), (banner, "cannot reach registry")):  # fmt: skip
            with pytest.raises(boxvm.ImageError, match=expected) as caught:
                await rt.images.pull(f"{fake.host}/app:v1")
            assert SECRET not in str(caught.value) and "root:" not in str(caught.value)


# -- redirects -----------------------------------------------------------------------------
async def test_a_blob_redirect_to_another_host_carries_no_authorization(
    rt: boxvm.Runtime, no_docker_config: Path
) -> None:
    image = Image.make()

    def storage(fake: Fake, h: Handler) -> None:
        image.serve(h)

    def registry(fake: Fake, h: Handler) -> None:
        if h.headers.get("Authorization") != BASIC:
            basic_challenge(fake, h)
        elif "/blobs/" in h.path:
            reply(h, 307, b"", {"Location": f"http://{cdn.host}/data/{h.path.rsplit('/', 1)[1]}"})
        else:
            image.serve(h)

    with fakes(storage) as (cdn,), fakes(registry) as (reg,):
        info = await rt.images.pull(f"{reg.host}/app:v1", username=USER, password=PASSWORD)
        assert info.digest == sha(image.manifest)
        assert sum(1 for path, auth in reg.seen if "/blobs/" in path and auth == BASIC) == 2
        assert len(cdn.seen) == 2 and cdn.authorizations() == []
    await rt.images.remove(info.digest)


# -- bounds --------------------------------------------------------------------------------
@contextlib.contextmanager
def bounded(what: str, seconds: float = 5, mib: float = 100) -> Iterator[None]:
    """Asserts the block ends within ``seconds`` and this process's RSS (sampled every
    10 ms) grows by less than ``mib``."""
    base, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    try:
        yield
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - t0
    assert elapsed < seconds and peak[0] - base < mib, f"{what}: {elapsed:.1f} s, +{peak[0] - base:.0f} MiB"


def huge_manifest(fake: Fake, h: Handler) -> None:
    endless(h, 200, {"Content-Type": OCI_MANIFEST}, b'{"layers": [' + b" " * ((1 << 20) - 12))


def declared_huge(fake: Fake, h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(1 << 40))
    h.end_headers()
    h.wfile.write(b"{" * (1 << 20))


def huge_error(fake: Fake, h: Handler) -> None:
    endless(h, 500)


def dripping_manifest(fake: Fake, h: Handler) -> None:
    h.send_response(200)
    h.end_headers()
    for _ in range(60):
        h.wfile.write(b" ")
        h.wfile.flush()
        time.sleep(0.5)


def many_layers(fake: Fake, h: Handler) -> None:
    desc = {"mediaType": OCI_LAYER_GZ, "digest": "sha256:" + "0" * 64, "size": 1}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc, "layers": [desc] * 1000}
    reply(h, 200, json.dumps(manifest).encode(), {"Content-Type": OCI_MANIFEST})


def huge_config(fake: Fake, h: Handler) -> None:
    desc = {"mediaType": OCI_CONFIG, "digest": "sha256:" + "0" * 64, "size": 1 << 40}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc, "layers": []}
    reply(h, 200, json.dumps(manifest).encode(), {"Content-Type": OCI_MANIFEST})


def gzip_bomb(fake: Fake, h: Handler) -> None:
    import gzip

    reply(
        h,
        200,
        gzip.compress(b" " * (16 << 20), compresslevel=1),
        {"Content-Encoding": "gzip", "Content-Type": OCI_MANIFEST},
    )


async def test_oversized_and_slow_answers_are_refused_fast_in_bounded_memory(
    rt: boxvm.Runtime, no_docker_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOXVM_REGISTRY_TIMEOUT", "2")
    cases = [
        (huge_manifest, "larger than 4194304 bytes"),
        (declared_huge, "larger than 4194304 bytes"),
        (huge_error, "answered HTTP 500"),
        (dripping_manifest, "took too long"),
        (many_layers, "at most 128 layers"),
        (huge_config, "no valid size"),
        (gzip_bomb, "content-encoded"),
    ]
    with fakes(*(route for route, _ in cases)) as servers:
        for fake, (route, expected) in zip(servers, cases, strict=True):
            with bounded(route.__name__), pytest.raises(boxvm.ImageError, match=expected):
                await rt.images.pull(f"{fake.host}/app:v1")
            assert not any("/blobs/" in path for path, _ in fake.seen), route.__name__


async def test_an_oversized_token_answer_is_refused(rt: boxvm.Runtime, no_docker_config: Path) -> None:
    def tokens(fake: Fake, h: Handler) -> None:
        endless(h, 200, {"Content-Type": "application/json"}, b'{"token": "' + b"a" * (1 << 20))

    with (
        fakes(tokens) as (realm,),
        fakes(bearer(f"http://{realm.host}/token")) as (reg,),
        bounded("token"),
        pytest.raises(boxvm.ImageError, match="token service's answer is larger"),
    ):
        await rt.images.pull(f"{reg.host}/app:v1")


# -- REST callers get nothing of the server's ----------------------------------------------
@pytest.fixture
def rest_server(home: Home, no_docker_config: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Fake]]:
    """A real ``boxvm serve`` whose own env holds credentials for a fake registry it lists
    for REST callers (``BOXVM_REST_REGISTRIES``); yields its URL and that registry."""
    with fakes(basic_challenge) as (reg,):
        env_credentials(monkeypatch, reg.host)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (no_docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        monkeypatch.setenv("BOXVM_REST_REGISTRIES", reg.host)
        with serving(home, "rest-registry-token") as (url, _pid):
            yield url, reg


async def test_rest_callers_get_no_server_credentials_insecure_or_loopback(
    rest_server: tuple[str, Fake], rt: boxvm.Runtime
) -> None:
    url, reg = rest_server
    async with boxvm.Runtime.remote(url, token="rest-registry-token") as remote:
        with pytest.raises(boxvm.ImageError, match=r"needs credentials: pass username/password with the pull$"):
            await remote.images.pull(f"{reg.host}/app:v1")
        with pytest.raises(boxvm.ImageError, match="needs credentials"):
            await remote.create(boxvm.BoxOptions(image=f"{reg.host}/app:v2"))
        assert reg.authorizations() == []
        with pytest.raises(boxvm.ImageError, match="refused the credentials"):  # the caller's own: used
            await remote.images.pull(f"{reg.host}/app:v1", username="caller", password="pw")
        assert reg.authorizations() == ["Basic " + base64.b64encode(b"caller:pw").decode()]
        # the same server settings, used locally, do send the server's credentials
        with pytest.raises(boxvm.ImageError, match="refused the credentials"):
            await rt.images.pull(f"{reg.host}/app:v1")
        assert reg.authorizations()[-1] == BASIC
        with fakes(basic_challenge) as (other,):  # loopback, not listed by the operator
            port = other.host.rsplit(":", 1)[1]
            for ref in (f"{other.host}/app:v1", f"localhost:{port}/app:v1"):
                with pytest.raises(boxvm.ImageError, match="BOXVM_REST_REGISTRIES"):
                    await remote.images.pull(ref)
            with pytest.raises(boxvm.ImageError, match="BOXVM_REST_REGISTRIES"):
                await remote.create(boxvm.BoxOptions(image=f"{other.host}/app:v1"))
            assert other.seen == []
        with pytest.raises(boxvm.ImageError, match=r"refused over REST.*BOXVM_INSECURE_REGISTRIES"):
            await remote.images.pull("registry.example:5000/app:v1", insecure=True)


async def test_rest_realm_on_an_unlisted_loopback_port_is_not_dialled(
    home: Home, no_docker_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fakes(token_service) as (realm,), fakes(bearer(f"http://{realm.host}/token")) as (reg,):
        monkeypatch.setenv("BOXVM_REST_REGISTRIES", reg.host)
        with serving(home, "rest-registry-token") as (url, _pid):
            async with boxvm.Runtime.remote(url, token="rest-registry-token") as remote:
                with pytest.raises(boxvm.ImageError, match="BOXVM_REST_REGISTRIES"):
                    await remote.images.pull(f"{reg.host}/app:v1")
        assert len(reg.seen) == 1 and realm.seen == []
