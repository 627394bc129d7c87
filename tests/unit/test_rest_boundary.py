"""The REST boundary under attack, without a VM: a browser page (foreign ``Host`` from DNS
rebinding, foreign ``Origin``) gets 403 before any route runs; a caller naming server paths
as images gets one fixed error whatever exists there; host ports only from the operator's
range; no-token mode only on loopback; the server's paths never leave in a message.

In-process against the real app (``httpx.ASGITransport``) over a fresh home; the WebSocket
and TLS halves of these checks need a real uvicorn and stay in ``tests/vm/test_security_rest.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from boxvm.errors import InvalidArgument
from boxvm.server.guard import NO_SERVER_PATHS, Scrubber
from boxvm.server.run import ServeOptions, serve
from tests.helpers import in_process

FOREIGN_HOSTS = ["evil.example", "attacker.com:8100", "127.0.0.1.evil.example", "localhost.evil.example:80"]
TOKEN = "unit-boundary-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_foreign_host_reaches_no_route_without_a_token(tmp_path: Path) -> None:
    """DNS rebinding: the page's own name in Host, the server's address underneath."""
    async with in_process(tmp_path / "home", None, port_range=(20000, 20009)) as api:
        for host in FOREIGN_HOSTS:
            for method, path, body in [
                ("GET", "/v1/config", None),
                ("GET", "/v1/openapi.json", None),
                ("GET", "/v1/boxes", None),
                ("POST", "/v1/boxes", {"name": "t-sec-rebound"}),
                ("DELETE", "/v1/images?reference=boxvm/default", None),
                ("GET", "/v1/no-such-route", None),
            ]:
                r = await api.http.request(method, path, json=body, headers={"Host": host})
                assert r.status_code == 403, (host, method, path, r.text)
                error = r.json()["error"]
                assert error["type"] == "Unauthorized" and error["status"] == 403 and "Host" in error["message"]
        assert api.backend.store.list_boxes() == []
        for good in ("127.0.0.1:8100", "localhost:8100", "127.0.0.1", "[::1]:8100"):
            assert (await api.http.get("/v1/boxes", headers={"Host": good})).status_code == 200


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_a_foreign_origin_is_refused_with_or_without_a_token(tmp_path: Path, token: str | None) -> None:
    async with in_process(tmp_path / "home", token) as api:
        api.http.headers.update(AUTH if token else {})
        host = "127.0.0.1:8100"
        for origin in ("http://evil.example", "null", "http://127.0.0.1:1", f"https://{host}", f"http://{host}/x"):
            headers = {"Host": host, "Origin": origin}
            r = await api.http.post("/v1/boxes", json={"name": "t-sec-origin"}, headers=headers)
            assert r.status_code == 403 and "Origin" in r.json()["error"]["message"], (origin, r.text)
        assert api.backend.store.list_boxes() == []
        same = await api.http.get("/v1/config", headers={"Host": host, "Origin": f"http://{host}"})
        assert same.status_code == 200


def tiny_layout(root: Path) -> str:
    """A minimal valid OCI layout (no layers): enough to be resolved and cached."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {}}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
    manifest |= {"config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config}, "layers": []}
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(json.dumps(manifest).encode())}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return str(desc["digest"])


async def test_server_paths_as_images_all_get_one_error_that_reveals_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    tiny_layout(layout)  # a real OCI layout on the server, not under an allowed directory
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"\0" * 1024)
    paths = ["/etc", "/etc/shadow", "/no/such/path", str(layout), str(archive), "./etc", "~/.ssh", "../../../etc"]
    seen = set()
    async with in_process(tmp_path / "home", TOKEN) as api:
        api.http.headers.update(AUTH)
        for path in paths:
            for r in (
                await api.http.post("/v1/images/pull", json={"reference": path}),
                await api.http.post("/v1/boxes", json={"name": "t-sec-img", "options": {"image": path}}),
            ):
                assert r.status_code == 400, (path, r.text)
                seen.add(r.text)
        assert api.backend.store.list_boxes() == [] and api.backend.store.list_images() == []
    assert len(seen) == 1, seen
    (message,) = seen
    assert NO_SERVER_PATHS in json.loads(message)["error"]["message"]
    for leak in (str(tmp_path), "/etc", "shadow", "OCI image layout", "not found"):
        assert leak not in message


async def test_only_paths_under_an_allowed_image_dir_load(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    digest = tiny_layout(allowed / "app")
    outside = tmp_path / "outside"
    tiny_layout(outside)
    (allowed / "to-etc").symlink_to("/etc")
    (allowed / "to-outside").symlink_to(outside)
    async with in_process(tmp_path / "home", TOKEN, image_dirs=(allowed,)) as api:
        api.http.headers.update(AUTH)
        r = await api.http.post("/v1/images/pull", json={"reference": str(allowed / "app")})
        assert r.status_code == 200 and r.json()["digest"] == digest, r.text
        refused = set()
        for path in [
            outside,
            allowed / "to-etc",
            allowed / "to-outside",
            allowed / "to-etc" / "shadow",
            allowed / "app" / ".." / ".." / "outside",
            allowed / "missing",
            allowed,
        ]:
            r = await api.http.post("/v1/images/pull", json={"reference": str(path)})
            assert r.status_code == 400, (path, r.text)
            refused.add(r.text)
        assert len(refused) == 1 and str(tmp_path) not in refused.pop()


async def test_host_ports_outside_the_operators_range_are_refused(tmp_path: Path) -> None:
    async with in_process(tmp_path / "home", TOKEN, port_range=(20000, 20009)) as api:
        api.http.headers.update(AUTH)
        for port in (19999, 20010, 22, 8100, 65535):
            r = await api.http.post(
                "/v1/boxes", json={"name": "t-sec-port", "options": {"ports": [[20001, 80], [port, 81]]}}
            )
            assert r.status_code == 400 and "20000-20009" in r.json()["error"]["message"], r.text
        assert api.backend.store.list_boxes() == []
    async with in_process(tmp_path / "home2", TOKEN) as api:  # no range: no host port at all
        r = await api.http.post(
            "/v1/boxes", json={"name": "t-sec-noports", "options": {"ports": [[20001, 80]]}}, headers=AUTH
        )
        assert r.status_code == 400 and "--port-range" in r.json()["error"]["message"]


def test_serve_refuses_a_public_address_without_a_token() -> None:
    for host in ("0.0.0.0", "192.0.2.1", "::"):
        with pytest.raises(InvalidArgument, match="without a token"):
            serve(ServeOptions(host=host, no_token=True))
    with pytest.raises(InvalidArgument, match="contradict"):
        serve(ServeOptions(no_token=True, token="t"))


def test_errors_leaving_the_server_carry_none_of_its_paths(tmp_path: Path) -> None:
    home, allowed = tmp_path / "home", tmp_path / "allowed"
    scrub = Scrubber([home, allowed])
    assert scrub(f"cannot write {home}/tmp/box-1-x/disk: full") == "cannot write <server path>: full"
    assert scrub(f"bad: '{Path.cwd()}/x'") == "bad: '<server path>'"
    assert scrub("no such file /root/app in the box; /usr/bin/env failed") == (
        "no such file /root/app in the box; /usr/bin/env failed"  # guest paths pass
    )
    assert scrub(f"{allowed}/layout") == "<server path>"
    shallow = Scrubber([Path("/boxvm"), Path("/images")])  # a home or image dir near the root
    assert shallow("cannot write /boxvm/boxes/abc/disk.qcow2, /images/x is bad") == (
        "cannot write <server path>, <server path> is bad"
    )
    assert scrub(f"{allowed}x/y") == f"{allowed}x/y"  # only the directory itself, not a name it begins
