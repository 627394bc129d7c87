"""Small helpers for the tests: processes and memory of the host, REST servers (real or in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from boxvm.backends.local import LocalBackend
from boxvm.backends.remote import RemoteBackend
from boxvm.disks.layers import TRASH_PREFIX
from boxvm.images import oci
from boxvm.paths import Home
from boxvm.server.run import local_app
from boxvm.state.boxes import owner_of


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_of(box_id: str) -> list[int]:
    """Every live process whose command line names the box (supervisor, QEMU)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if box_id.encode() in f.read() and pid_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def leftovers(home: Home, pids: list[int]) -> list[Path]:
    """Staging directories and uncommitted boxes of these processes (other tests' work in
    the shared test home, from other workers, is not counted; nor is a process's trash, where
    its deletions finish in the background: ``boxvm.disks.layers.Trash``)."""
    tags = [f"-{pid}-" for pid in pids]
    staged = [p for p in home.tmp.iterdir() if any(t in p.name for t in tags) and not p.name.startswith(TRASH_PREFIX)]
    owned = [p for p in home.boxes.iterdir() if owner_of(p) in pids]
    return staged + owned


@contextlib.contextmanager
def serving(
    home: Home, token: str | None, *args: str, port_range: str | None = "1024-65535"
) -> Iterator[tuple[str, int]]:
    """A real ``boxvm serve`` on a free loopback port over ``home``: (base URL, pid).
    ``token`` None: none given (pass ``--no-token`` in ``args``, or the home's is used).
    By default boxes may forward any unprivileged port (the tests pick free ones)."""
    auth = ["--token", token] if token else []
    ports = ["--port-range", port_range] if port_range else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "boxvm.cli.main", *auth, "serve", "--port", "0", *ports, *args],
        # the tests' registries run on 127.0.0.1: REST callers may use them (see boxvm.images.registry)
        env={"BOXVM_REST_REGISTRIES": "127.0.0.1", **os.environ, "BOXVM_HOME": str(home.root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        if "serving" not in line:
            raise RuntimeError(f"boxvm serve did not start: {line!r}")
        yield line.split()[-1].removesuffix("/v1"), proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class InProcess:
    """The real app over a LocalBackend, reached without a socket (``httpx.ASGITransport``)."""

    app: FastAPI
    backend: LocalBackend
    http: httpx.AsyncClient  # no Authorization header: tests add it

    def client(self, token: str | None) -> RemoteBackend:
        """The REST client (``Runtime.remote``'s backend) over this app; close it after use."""
        return RemoteBackend("http://127.0.0.1", token, transport=httpx.ASGITransport(app=self.app))


@contextlib.asynccontextmanager
async def in_process(
    root: Path, token: str | None, image_dirs: tuple[Path, ...] = (), port_range: tuple[int, int] | None = None
) -> AsyncIterator[InProcess]:
    """``boxvm serve``'s app over a fresh home at ``root``: no server process, no guest, no VM."""
    backend = LocalBackend(Home.default(root))
    app = local_app(backend, token, image_dirs, port_range)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield InProcess(app, backend, http)
    finally:
        await backend.close()


def build_layout(dest: Path, layers: list[bytes], config: dict[str, object]) -> Path:
    """An OCI layout with several layers (the layer blobs given as bytes)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    descs = [
        put(layer, "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if layer[:2] == b"\x1f\x8b" else ""))
        for layer in layers
    ]
    cfg = put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": cfg, "layers": descs}
    man = put(json.dumps(manifest).encode(), oci.OCI_MANIFEST)
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest


def rewrite_member(tar_bytes: bytes, member: str, change: Callable[[bytes], bytes]) -> bytes:
    """A plain tar archive with one member's bytes replaced by ``change(bytes)`` (sizes follow)."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar_bytes)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for info in src.getmembers():
            body = src.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == member:
                body = change(body)
                info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    return out.getvalue()


def started(path: str) -> str:
    """A guest shell wait (up to 30 s) for a background loop's first write of ``path``:
    under load its first round can take longer than any fixed sleep; a file still missing
    then fails the read that follows, with its name."""
    return f"i=0; while [ ! -e {path} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"


async def released(box: Any, depth: int | None = None) -> None:
    """Wait until the supervisor has folded an export's capture back (it does so in the
    background after the export) and, with ``depth``, the chain is that long again."""
    for _ in range(300):
        info = await box.info()
        if (depth is None or info.chain_depth == depth) and "release_ms" in info.timings:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the export's capture was not released: chain depth {info.chain_depth}, not {depth}")
