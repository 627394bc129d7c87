"""Registry pulls against a real registry (Debian's docker-registry on 127.0.0.1), with
and without htpasswd auth: images built and pushed here, pulled through boxvm, booted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import boxvm
from boxvm.images import oci
from boxvm.images.default import ensure_slim
from boxvm.images.reference import parse
from boxvm.paths import Home
from tests.registry import (
    RegistryServer,
    TokenIssuer,
    answer_again,
    layer,
    push_image,
    push_index,
    stop_answering,
)

ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello-from-config"]


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry-auth"), "tester", "s3cret").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with bearer-token auth, and a token service (uvicorn) that knows one user."""
    root = tmp_path_factory.mktemp("registry-token")
    issuer = TokenIssuer(root)
    app = FastAPI()
    good = "Basic " + base64.b64encode(b"tester:s3cret").decode()

    @app.get("/token")
    def token(request: Request, service: str, scope: str = "") -> JSONResponse:
        if request.headers.get("authorization") != good or service != issuer.service:
            return JSONResponse({"details": "access denied"}, status_code=401)
        kind, name, actions = scope.split(":") if scope else ("", "", "")
        access = [{"type": kind, "name": name, "actions": actions.split(",")}] if scope else []
        return JSONResponse({"token": issuer.token("tester", access), "expires_in": 600})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    service = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=service.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    realm = f"http://127.0.0.1:{sock.getsockname()[1]}/token"
    server = RegistryServer(root, token_realm=realm, issuer=issuer).start()
    yield server
    server.stop()
    service.should_exit = True
    thread.join(10)


@pytest.fixture(scope="session")
def base_layer(home: Home, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str, str]:
    """The slim image's root filesystem layer: a shell and tools for the test images (a
    fifth of the default image's bytes to push, pull and convert)."""
    image = oci.read_layout(ensure_slim(home, print), tmp_path_factory.mktemp("slim"))
    (first,) = image.layers
    blob = (image.layout / "blobs" / "sha256" / first.digest.split(":")[1]).read_bytes()
    return blob, image.config["rootfs"]["diff_ids"][0], first.media_type


def app_layers(tag: str) -> list[tuple[bytes, str]]:
    """Three layers: files, then an overwrite, then a whiteout. ``tag`` makes them unique
    (the test home's blob cache outlives a run)."""
    return [
        layer({"opt": None, "opt/gone.txt": f"deleted by a later layer {tag}\n".encode(), "opt/keep.txt": b"kept\n"}),
        layer({"app": None, "app/data.txt": f"app data {tag}\n".encode(), "opt/keep.txt": b"kept, updated\n"}),
        layer({"opt/.wh.gone.txt": b"", "app/stamp": tag.encode()}),
    ]


def unique(name: str) -> str:
    return f"{name}-{os.urandom(3).hex()}"


@pytest.mark.backends("local", "remote")
async def test_pull_boot_merged_filesystem_and_config(
    rt: boxvm.Runtime,
    open_registry: RegistryServer,
    base_layer: tuple[bytes, str, str],
    home: Home,
    backend_kind: str,
) -> None:
    repo, tag = unique("test/app"), unique("v1")
    with open_registry.client() as http:
        pushed = push_image(
            http, repo, "v1", base_layer, app_layers(tag), env=ENV, workdir="/app", cmd=["cat", "data.txt"]
        )
        arm = push_image(http, repo, "arm", None, [layer({"arm": b"not for us\n"})], arch="arm64")
        index = push_index(http, repo, "multi", [(arm, "arm64"), (pushed, "amd64")])
    ref = f"{open_registry.host}/{repo}"
    box = await rt.create(boxvm.BoxOptions(image=f"{ref}:multi"), name=unique("t-pulled"))
    try:
        info = await box.info()
        assert info.image == f"{ref}:multi" and info.command == ["cat", "data.txt"]
        cached = {name: i for i in await rt.images.list() for name in i.references}
        assert cached[f"{ref}:multi"].digest == pushed.manifest_digest != index  # amd64 picked from the index
        await box.start()
        r = await box.exec(["sh", "-c", "echo $GREETING; pwd; cat data.txt /opt/keep.txt; ls /opt"])
        assert r.stdout.decode().splitlines() == [
            "hello-from-config",
            "/app",
            f"app data {tag}",
            "kept, updated",
            "keep.txt",
        ]
        # by digest: the same cached image, no download
        gets = open_registry.blob_gets(pushed.layer_digests[1])
        same = await rt.images.pull(f"{ref}@{pushed.manifest_digest}")
        assert same.digest == pushed.manifest_digest and open_registry.blob_gets(pushed.layer_digests[1]) == gets
        with pytest.raises(boxvm.InvalidState, match="used by"):
            await rt.images.remove(f"{ref}:multi")
    finally:
        await rt.remove(box.id, force=True)
    if backend_kind == "local":  # `boxvm run` with no command runs the image's Cmd, in its WorkingDir
        env = {**os.environ, "BOXVM_HOME": str(home.root)}
        cli = [sys.executable, "-m", "boxvm.cli.main", "run", "--rm", "--image", f"{ref}:v1"]
        r = subprocess.run(cli, env=env, capture_output=True, timeout=300)
        assert r.returncode == 0 and r.stdout == f"app data {tag}\n".encode(), r.stderr
    await rt.images.remove(f"{ref}:multi")
    assert pushed.manifest_digest not in {i.digest for i in await rt.images.list()}


async def refuses_then_accepts(rt: boxvm.Runtime, ref: str, digest: str) -> None:
    """No credentials, wrong ones, right ones (tester / s3cret) given to the call."""
    with pytest.raises(boxvm.ImageError, match="needs credentials"):
        await rt.images.pull(ref)
    with pytest.raises(boxvm.ImageError, match="refused the credentials"):
        await rt.images.pull(ref, username="tester", password="wrong")
    assert (await rt.images.pull(ref, username="tester", password="s3cret")).digest == digest
    await rt.images.remove(ref)


async def test_credentials_from_options_env_and_docker_config(
    rt: boxvm.Runtime,
    auth_registry: RegistryServer,
    home: Home,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = unique("private/app")
    with auth_registry.client() as http:
        pushed = push_image(http, repo, "v1", None, app_layers(unique("private")))
    ref = f"{auth_registry.host}/{repo}:v1"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # no credentials anywhere yet
    await refuses_then_accepts(rt, ref, pushed.manifest_digest)
    monkeypatch.setenv("BOXVM_REGISTRY_USERNAME", "tester")
    monkeypatch.setenv("BOXVM_REGISTRY_PASSWORD", "s3cret")
    monkeypatch.setenv("BOXVM_REGISTRY_HOST", auth_registry.host)  # env credentials are for this registry only
    assert (await rt.images.pull(ref)).digest == pushed.manifest_digest
    await rt.images.remove(ref)
    monkeypatch.delenv("BOXVM_REGISTRY_HOST")
    monkeypatch.delenv("BOXVM_REGISTRY_USERNAME")
    monkeypatch.delenv("BOXVM_REGISTRY_PASSWORD")
    auth = base64.b64encode(b"tester:s3cret").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    assert (await rt.images.pull(ref)).digest == pushed.manifest_digest
    await rt.images.remove(ref)


async def test_bearer_token_auth(
    rt: boxvm.Runtime, token_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker Hub's scheme: a 401 with a Bearer challenge, a token from the realm (basic
    auth there), then the registry accepts the signed token for this repository's pull."""
    repo = unique("token/app")
    with token_registry.client(repo) as http:
        pushed = push_image(http, repo, "v1", None, app_layers(unique("token")))
    ref = f"{token_registry.host}/{repo}:v1"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    # the token service is plain HTTP on another port: credentials go there only if it is marked insecure
    monkeypatch.setenv("BOXVM_INSECURE_REGISTRIES", str(token_registry.token_realm).split("/")[2])
    await refuses_then_accepts(rt, ref, pushed.manifest_digest)


@pytest.mark.backends("local", "remote")
async def test_unknown_images_and_platforms(rt: boxvm.Runtime, open_registry: RegistryServer) -> None:
    repo = unique("test/plat")
    with open_registry.client() as http:
        arm = push_image(http, repo, "arm", None, [layer({"x": b"arm\n"})], arch="arm64")
        push_index(http, repo, "armonly", [(arm, "arm64")])
    with pytest.raises(boxvm.ImageError, match="not found"):
        await rt.images.pull(f"{open_registry.host}/{repo}:no-such-tag")
    with pytest.raises(boxvm.ImageError, match="not found"):
        await rt.images.pull(f"{open_registry.host}/no/such-repo:v1")
    with pytest.raises(boxvm.ImageError, match=r"no linux/amd64 variant \(it offers linux/arm64\)"):
        await rt.images.pull(f"{open_registry.host}/{repo}:armonly")
    with pytest.raises(boxvm.ImageError, match="invalid image reference"):
        await rt.images.pull("Not/Valid:ref")


def _cached_blob(home: Home, digest: str) -> bool:
    return (home.images / "blobs" / "sha256" / digest.split(":")[1]).exists()


async def test_tampered_and_truncated_blobs_are_rejected_not_cached(
    rt: boxvm.Runtime, open_registry: RegistryServer, home: Home
) -> None:
    repo = unique("test/tamper")
    with open_registry.client() as http:
        pushed = push_image(http, repo, "v1", None, app_layers(unique("tamper")))
    ref = f"{open_registry.host}/{repo}:v1"
    target = pushed.layer_digests[1]
    data = open_registry.blob_file(target)
    original = data.read_bytes()
    try:
        data.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # same size, other bytes
        with pytest.raises(boxvm.ImageError, match="does not match its digest"):
            await rt.images.pull(ref)
        assert not _cached_blob(home, target)
        data.write_bytes(original[: len(original) // 2])
        with pytest.raises(boxvm.ImageError, match=r"truncated|stopped sending"):
            await rt.images.pull(ref)
        assert not _cached_blob(home, target)
        assert not (home.images / "layouts" / pushed.manifest_digest.split(":")[1]).exists()
    finally:
        data.write_bytes(original)
    assert (await rt.images.pull(ref)).digest == pushed.manifest_digest  # repaired: it works
    await rt.images.remove(ref)


async def test_a_registry_that_stops_answering_mid_pull(
    rt: boxvm.Runtime, open_registry: RegistryServer, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = unique("test/stall")
    big = layer({"big.bin": os.urandom(48 << 20)})
    with open_registry.client() as http:
        pushed = push_image(http, repo, "v1", None, [big])
    ref = f"{open_registry.host}/{repo}:v1"
    monkeypatch.setenv("BOXVM_REGISTRY_TIMEOUT", "2")
    partial = home.images / "blobs" / "partial" / pushed.layer_digests[0].split(":")[1]
    pull = asyncio.create_task(rt.images.pull(ref))
    while not (partial.exists() and partial.stat().st_size > 0) and not pull.done():
        await asyncio.sleep(0.005)
    stop_answering(open_registry)
    try:
        with pytest.raises(boxvm.ImageError, match=r"stopped sending|cannot reach"):
            await pull
    finally:
        answer_again(open_registry)
    assert not _cached_blob(home, pushed.layer_digests[0])
    assert pushed.manifest_digest not in {i.digest for i in await rt.images.list()}
    assert (await rt.images.pull(ref)).digest == pushed.manifest_digest  # resumes and completes
    assert _cached_blob(home, pushed.layer_digests[0]) and not partial.exists()
    await rt.images.remove(ref)


async def test_concurrent_pulls_download_once(rt: boxvm.Runtime, open_registry: RegistryServer) -> None:
    repo = unique("test/twice")
    with open_registry.client() as http:
        pushed = push_image(http, repo, "v1", None, [layer({"f": os.urandom(4 << 20)}), *app_layers(unique("twice"))])
    ref = f"{open_registry.host}/{repo}:v1"
    infos = await asyncio.gather(*(rt.images.pull(ref) for _ in range(3)))
    assert {i.digest for i in infos} == {pushed.manifest_digest}
    assert all(open_registry.blob_gets(d) == 1 for d in pushed.layer_digests)
    await rt.images.remove(ref)


def test_reference_conventions() -> None:
    assert str(parse("alpine")) == "docker.io/library/alpine:latest"
    assert str(parse("alpine:3.20")) == "docker.io/library/alpine:3.20"
    assert str(parse("team/app")) == "docker.io/team/app:latest"
    r = parse("registry.example:5000/team/app@sha256:" + "a" * 64)
    assert (r.registry, r.repository, r.tag, r.digest) == (
        "registry.example:5000",
        "team/app",
        None,
        "sha256:" + "a" * 64,
    )
    assert parse("localhost/app").registry == "localhost" and parse("alpine").api_host == "registry-1.docker.io"
    for bad in ("UPPER", "a:b:c", "x@sha256:12", "", "a//b", " alpine"):
        with pytest.raises(boxvm.ImageError):
            parse(bad)


def test_plain_http_only_for_loopback_or_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    from boxvm.images.registry import plain_http_allowed

    assert plain_http_allowed(parse("127.0.0.1:5000/a"), False) and plain_http_allowed(parse("localhost:1/a"), False)
    assert not plain_http_allowed(parse("registry.example:5000/a"), False)
    assert plain_http_allowed(parse("registry.example:5000/a"), True)
    monkeypatch.setenv("BOXVM_INSECURE_REGISTRIES", "registry.example:5000")
    assert plain_http_allowed(parse("registry.example:5000/a"), False)
