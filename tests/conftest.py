"""Shared fixtures. Every VM test boots real QEMU guests (TCG here): nothing is mocked.

Tests come in two tiers: ``tests/unit`` needs no guest bundle, image or QEMU and runs in
seconds; ``tests/vm`` (and the older files at the top level) boot real guests.

The test home (``$BOXVM_TEST_HOME``, default ``.test-home`` in the repository) keeps
the guest bundle and default image between runs; the controlling process prepares it
once and clears boxes left over from an interrupted run before any worker starts.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

import boxvm
from boxvm.backends.local import LocalBackend
from boxvm.paths import Home
from tests.helpers import serving

pytest_plugins = ["tests.s3server"]  # a real S3 server (SeaweedFS) on loopback, and the AWS env pointing at it
REPO = Path(__file__).resolve().parent.parent
_LOCK = pytest.StashKey[object]()
TEST_HOME = Path(os.environ.get("BOXVM_TEST_HOME", REPO / ".test-home")).absolute()


def pytest_configure(config: pytest.Config) -> None:
    os.environ["BOXVM_HOME"] = str(TEST_HOME)
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has prepared the home
    if not _needs_vms(config):
        return  # the unit tier needs no guest bundle, image or QEMU
    # One session per test home: the clean-up below removes every box in it.
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    lock = open(TEST_HOME / ".session.lock", "w")  # noqa: SIM115  held for the whole session
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pytest.exit(f"another test session is using {TEST_HOME}; set BOXVM_TEST_HOME to run a second one", 2)
    config.stash[_LOCK] = lock
    from boxvm.backends.local import LocalBackend
    from boxvm.guest import bundle
    from boxvm.images.default import ensure_default

    home = Home.default(TEST_HOME)
    bundle.ensure(home, print)
    _seed_builtin_images(home)
    ensure_default(home, print)

    async def clear() -> None:
        backend = LocalBackend(home)
        for info in await backend.list():
            await backend.remove(info.id, force=True)
        await backend.close()

    asyncio.run(clear())


def _needs_vms(config: pytest.Config) -> bool:
    """Whether this session may run a test outside ``tests/unit`` (the tier that needs no VM)."""
    unit = REPO / "tests" / "unit"
    paths = [Path(arg.split("::")[0]).absolute() for arg in config.args]
    return not paths or not all(path.is_relative_to(unit) for path in paths)


def _seed_builtin_images(home: Home) -> None:
    """Hard-link the built-in images ``boxvm setup`` built in the user's home (``make test``
    runs it first) into the test home, so the suite does not build them a second time; the
    builds are content-addressed, so an outdated seed is simply not used."""
    setup_images = Path.home() / ".boxvm" / "images"
    for name in ("default", "slim"):
        for build in setup_images.glob(f"{name}/*/index.json"):
            target = home.images / name / build.parent.name
            if not target.exists() and home.images.resolve() != setup_images.resolve():
                staged = home.tmp / f"seed-{name}-{build.parent.name}"
                shutil.rmtree(staged, ignore_errors=True)
                shutil.copytree(build.parent, staged, copy_function=_link_or_copy)
                target.parent.mkdir(parents=True, exist_ok=True)
                staged.rename(target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def home() -> Home:
    return Home.default(TEST_HOME)


@pytest.fixture(scope="session")
def worker(request: pytest.FixtureRequest) -> str:
    return getattr(request.config, "workerinput", {}).get("workerid", "main")


TOKEN = "test-" + os.urandom(8).hex()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``backends("local", "remote")`` run once per backend; others locally."""
    if "backend_kind" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("backend_kind", marker.args if marker else ("local",), scope="session")


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@pytest.fixture(scope="session")
def server(home: Home) -> Iterator[Server]:
    """A real ``boxvm serve`` (uvicorn) on a free loopback port, over the test home."""
    with serving(home, TOKEN) as (url, pid):
        yield Server(url, pid)


@pytest.fixture(scope="session")
def local(home: Home) -> LocalBackend:
    """The test home seen directly, for checks behind the API (files, records)."""
    return LocalBackend(home)


@pytest_asyncio.fixture(scope="session")
async def rt(home: Home, backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[boxvm.Runtime]:
    if backend_kind == "remote":
        runtime = boxvm.Runtime.remote(request.getfixturevalue("server").url, token=TOKEN)
    else:
        runtime = boxvm.Runtime(home.root)
    yield runtime
    await runtime.close()


@pytest_asyncio.fixture(scope="session")
async def shared_box(rt: boxvm.Runtime, worker: str) -> AsyncIterator[boxvm.Box]:
    """One running box per worker for tests that only read or write their own paths."""
    box = await rt.create(name=f"shared-{worker}-{os.urandom(2).hex()}")
    await box.start()
    yield box
    await rt.remove(box.id, force=True)


@pytest_asyncio.fixture
async def fresh_box(rt: boxvm.Runtime, request: pytest.FixtureRequest) -> AsyncIterator[boxvm.Box]:
    """A new, not yet started box, removed (forcibly) after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60] + "-" + os.urandom(2).hex()
    box = await rt.create(name=name)
    yield box
    if await rt.get(box.id) is not None:
        await rt.remove(box.id, force=True)
