"""The REST boundary under attack, against real ``boxvm serve`` processes (uvicorn) on loopback.

The exec WebSocket refuses a foreign ``Host`` or ``Origin`` with 403; the built-in image works
while server paths are refused; a host port inside the operator's range is forwarded; TLS end
to end; no-token mode is opt-in; the CLI imports archives as untrusted unless told otherwise.
The same checks over plain HTTP, which need no VM, are in ``tests/unit/test_rest_boundary.py``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import boxvm
from boxvm.images.default import ensure_default
from boxvm.localauth import token_path
from boxvm.paths import Home
from tests.conftest import TOKEN
from tests.helpers import serving
from tests.vm.test_cli import boxvm as cli

pytestmark = pytest.mark.asyncio
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FOREIGN_HOSTS = ["evil.example", "attacker.com:8100", "127.0.0.1.evil.example", "localhost.evil.example:80"]


@pytest.fixture(scope="module")
def open_server(home: Home) -> Iterator[str]:
    """No token (opt-in), host ports 20000-20009 allowed."""
    with serving(home, None, "--no-token", port_range="20000-20009") as (url, _pid):
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def names(http: httpx.AsyncClient) -> set[str]:
    return {b["name"] for b in (await http.get("/v1/boxes")).json()}


# -- Host and Origin ----------------------------------------------------------------------------


async def raw_upgrade(url: str, host: str) -> bytes:
    """A WebSocket handshake written by hand, so that the Host header is the attacker's."""
    port = port_of(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/boxes/nothing/exec HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return status


async def test_the_exec_websocket_refuses_foreign_host_and_origin(open_server: str) -> None:
    ws_url = "ws" + open_server[4:] + "/v1/boxes/no-such-box/exec"
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url, origin="http://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    for host in FOREIGN_HOSTS:
        assert (await raw_upgrade(open_server, host)).startswith(b"HTTP/1.1 403")
    assert (await raw_upgrade(open_server, f"127.0.0.1:{port_of(open_server)}")).startswith(b"HTTP/1.1 101")
    # a loopback client without an Origin reaches the route (which finds no such box)
    async with connect(ws_url, open_timeout=10) as ws:
        await ws.send(json.dumps({"argv": ["true"]}))
        reply = json.loads(await ws.recv())
    assert reply["type"] == "error" and reply["error"]["type"] == "NotFound"


# -- no-token mode is opt-in ---------------------------------------------------------------------


async def test_serve_generates_a_private_token_and_local_clients_use_it(home: Home) -> None:
    with serving(home, None, port_range=None) as (url, _pid):
        path = token_path(home)
        mode = path.stat().st_mode
        assert stat.S_IMODE(mode) == 0o600 and path.stat().st_uid == os.geteuid()
        token = path.read_text().strip()
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/v1/boxes")).status_code == 401
            assert (await http.get("/v1/boxes", headers={"Authorization": f"Bearer {token}"})).status_code == 200
            # and without --port-range it forwards no host port at all
            r = await http.post(
                "/v1/boxes",
                json={"name": "t-sec-noports", "options": {"ports": [[20001, 80]]}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 400 and "--port-range" in r.json()["error"]["message"]
        async with boxvm.Runtime.remote(url) as rt:  # picks the home's token up by itself
            assert "t-sec-noports" not in [b.name for b in await rt.list()]


# -- images are registry references ------------------------------------------------------------


async def test_server_paths_as_images_all_get_one_error_that_reveals_nothing(
    open_server: str, home: Home, tmp_path: Path
) -> None:
    layout = ensure_default(home)  # a real OCI layout on the server
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"\0" * 1024)
    paths = ["/etc", "/etc/shadow", "/no/such/path", str(layout), str(archive), "./etc", "~/.ssh", "../../../etc"]
    seen = set()
    async with httpx.AsyncClient(base_url=open_server) as http:
        for path in paths:
            for r in (
                await http.post("/v1/images/pull", json={"reference": path}),
                await http.post("/v1/boxes", json={"name": "t-sec-img", "options": {"image": path}}),
            ):
                assert r.status_code == 400, (path, r.text)
                seen.add(r.text)
        assert "t-sec-img" not in await names(http)
        # the built-in image still works, by default and by name
        for body in ({"name": "t-sec-default"}, {"name": "t-sec-default2", "options": {"image": "boxvm/default"}}):
            r = await http.post("/v1/boxes", json=body)
            assert r.status_code == 201, r.text
            assert (await http.delete(f"/v1/boxes/{r.json()['id']}")).status_code == 204
    assert len(seen) == 1, seen
    (message,) = seen
    assert "registry reference" in message
    for leak in (str(home.root), str(layout), str(tmp_path), "/etc", "shadow", "OCI image layout", "not found"):
        assert leak not in message


# -- host ports --------------------------------------------------------------------------------


async def test_a_host_port_inside_the_operators_range_is_forwarded(open_server: str) -> None:
    async with httpx.AsyncClient(base_url=open_server) as http:
        r = await http.post("/v1/boxes", json={"name": "t-sec-port", "options": {"ports": [[20005, 80]]}})
        assert r.status_code == 201 and r.json()["ports"] == [[20005, 80]], r.text
        await http.delete(f"/v1/boxes/{r.json()['id']}")


# -- TLS ---------------------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "boxvm test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_tls_end_to_end(
    home: Home, shared_box: boxvm.Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    with serving(home, TOKEN, "--tls-cert", str(cert), "--tls-key", str(key)) as (url, _pid):
        assert url.startswith("https://127.0.0.1:")
        async with boxvm.Runtime.remote(url, token=TOKEN, ca_bundle=cert) as rt:
            box = await rt.create(name="t-sec-tls")
            assert "t-sec-tls" in [b.name for b in await rt.list()]
            await rt.remove(box.id)
            running = await rt.get(shared_box.id)  # exec over wss
            assert running is not None
            assert (await running.exec(["echo", "over-tls"])).stdout == b"over-tls\n"
        monkeypatch.setenv("BOXVM_CA_BUNDLE", str(cert))
        async with boxvm.Runtime.remote(url, token=TOKEN) as rt:
            await rt.list()
        monkeypatch.delenv("BOXVM_CA_BUNDLE")
        for wrong in (url, "http" + url[5:]):  # an unknown certificate; plain HTTP to a TLS port
            async with boxvm.Runtime.remote(wrong, token=TOKEN) as rt:
                with pytest.raises(boxvm.EngineError, match="cannot reach"):
                    await rt.list()


# -- the CLI imports untrusted by default --------------------------------------------------------


async def test_cli_import_is_untrusted_unless_told(home: Home, tmp_path: Path) -> None:
    greedy = boxvm.BoxOptions(cpus=64, memory_mib=65536, ports=[(20123, 80)])
    async with boxvm.Runtime(home.root) as rt:
        src = await rt.create(greedy, name="t-sec-greedy")
        try:
            archive = await src.export(tmp_path / "greedy.boxsnap", boxvm.ExportOptions(compression_level=1))
        finally:
            await rt.remove(src.id)
        made = []
        try:
            for name, flags in (("t-sec-untrusted", []), ("t-sec-trusted", ["--trusted"])):
                r = cli(home, "import", str(archive), "--name", name, *flags)
                assert r.returncode == 0, r.stderr
                info = await rt.get(name)
                assert info is not None
                made.append(info)
            untrusted, trusted = [await b.info() for b in made]
            assert untrusted.ports == [] and untrusted.cpus <= (os.cpu_count() or 1) and untrusted.memory_mib <= 4096
            assert trusted.ports == [(20123, 80)] and trusted.cpus == 64 and trusted.memory_mib == 65536
        finally:
            for box in made:
                await rt.remove(box.id)
