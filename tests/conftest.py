"""Shared fixtures. Every VM test boots real QEMU guests (TCG here): nothing is mocked.

Tests come in two tiers: ``tests/unit`` needs no guest bundle, image or QEMU and runs in
seconds; ``tests/vm`` (and the older files at the top level) boot real guests.

The test home (``$BOXVM_TEST_HOME``, default ``.test-home`` in the repository) keeps
the guest bundle and default image between runs; the controlling process prepares it
once and clears boxes left over from an interrupted run before any worker starts. It
has warm-start templates of the default and the slim machine (seeded from ``boxvm
setup``'s, or made once), so those boxes resume in a second or two; a test that needs
a real boot (boot ids, the console at boot, the clock set at boot) uses ``cold_box`` or
passes ``BoxOptions(warm=False)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

import boxvm
from boxvm import templates
from boxvm.backends.local import LocalBackend
from boxvm.guest import bundle
from boxvm.paths import Home
from tests.helpers import serving

pytest_plugins = ["tests.s3server"]  # a real S3 server (SeaweedFS) on loopback, and the AWS env pointing at it
REPO = Path(__file__).resolve().parent.parent
_LOCK = pytest.StashKey[object]()
TEST_HOME = Path(os.environ.get("BOXVM_TEST_HOME", REPO / ".test-home")).absolute()
SETUP_HOME = Home(Path.home() / ".boxvm")  # what ``boxvm setup`` (``make test`` runs it first) made
# The machines most of the suite's boxes are: the default image and the slim one, default sizes.
WARM = (boxvm.BoxOptions(), boxvm.BoxOptions(image="boxvm/slim"))


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
    from boxvm.images.default import ensure_default

    home = Home.default(TEST_HOME)
    home.ensure()
    _seed_bundle(home)
    bundle.ensure(home, print)
    _seed_builtin_images(home)
    ensure_default(home, print)
    _seed_templates(home)

    async def clear() -> None:
        backend = LocalBackend(home)
        for info in await backend.list():
            await backend.release_lease(info.id, None)  # a move a killed run left holding it
            await backend.remove(info.id, force=True)
        await _ensure_templates(backend)
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
    if home.images.resolve() == SETUP_HOME.images.resolve():
        return
    for name in ("default", "slim"):
        for build in SETUP_HOME.images.glob(f"{name}/*/index.json"):
            _seed_dir(home, build.parent, home.images / name / build.parent.name)


def _seed_bundle(home: Home) -> None:
    """Hard-link the guest bundle ``boxvm setup`` made last (if this home lacks it): the
    bundle build is not byte-reproducible, so a seeded template needs this very copy, and
    the suite does not build it a second time. An outdated one is simply not used."""
    made = bundle.find(SETUP_HOME)
    if made is not None and home.root.resolve() != SETUP_HOME.root.resolve():
        _seed_dir(home, made.path, home.guest / made.id)


def _seed_templates(home: Home) -> None:
    """Hard-link ``boxvm setup``'s warm-start templates whose backing files this home shares
    (the same bundle and the same image base disk: both are rebuilt with other bytes
    under the same id, and a template's saved RAM holds what the guest read of them)."""
    if home.root.resolve() == SETUP_HOME.root.resolve():
        return
    for made in templates.list_all(SETUP_HOME):
        base = Path("images", made.image_digest.split(":")[1], f"base-{made.disk_size_gb}g.qcow2")
        if not (home.root / base).exists() and (SETUP_HOME.root / base).is_file():  # else built at a first create
            (home.root / base).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # another filesystem: not shared, so not seeded
                os.link(SETUP_HOME.root / base, home.root / base)
        shared = [base, Path("guest", made.guest_bundle, "rootfs.ext4")]
        if all((home.root / p).exists() and os.path.samefile(home.root / p, SETUP_HOME.root / p) for p in shared):
            _seed_dir(home, templates.root(SETUP_HOME) / made.id, templates.root(home) / made.id)


async def _ensure_templates(backend: LocalBackend) -> None:
    """Make the template of each machine in ``WARM`` here if seeding gave none (one cold
    boot each in the controller, ~10 s under TCG, before any worker starts): first starts
    of those machines' boxes then resume in a second or two instead of booting (5-8 s, 15+
    under load). The template's key (``templates.machine``) is read off a probe box."""
    for options in WARM:
        probe = await backend.create(options, f"suite-template-probe-{os.urandom(2).hex()}")
        rec = backend.store.get_box(probe.id)
        await backend.remove(probe.id, force=True)
        assert rec is not None
        if not (templates.root(backend.home) / templates.key(templates.machine(rec))).is_dir():
            t0 = time.monotonic()
            made = await backend.template_create(options)
            print(f"warm-start template {made.id} of {made.image} made in {time.monotonic() - t0:.1f} s")


def _seed_dir(home: Home, src: Path, target: Path) -> None:
    """``src`` hard-linked file by file to ``target`` (published by one rename), if missing."""
    if target.exists():
        return
    staged = home.tmp / f"seed-{target.parent.name}-{target.name}"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(src, staged, copy_function=_link_or_copy)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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


# Modules holding the longest tests (a minute or more under ``make test``): run first.
LONG_FIRST = ("test_ray.py", "test_snapshots.py", "test_concurrency.py", "test_rest.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first and the unit tier last (each module's own order kept):
    xdist hands tests out in this order, so a ``-n 2`` run ends with short tests on both
    workers instead of one long test on one while the other idles."""

    def rank(item: pytest.Item) -> int:
        if item.path.is_relative_to(REPO / "tests" / "unit"):
            return 2
        return 0 if item.path.name in LONG_FIRST else 1

    items.sort(key=rank)


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
    async for box in _fresh(rt, request, boxvm.BoxOptions()):
        yield box


@pytest_asyncio.fixture
async def cold_box(rt: boxvm.Runtime, request: pytest.FixtureRequest) -> AsyncIterator[boxvm.Box]:
    """``fresh_box`` whose first start boots (``warm=False``), for tests of what a boot does."""
    async for box in _fresh(rt, request, boxvm.BoxOptions(warm=False)):
        yield box


@pytest_asyncio.fixture
async def fresh_slim_box(rt: boxvm.Runtime, request: pytest.FixtureRequest) -> AsyncIterator[boxvm.Box]:
    """``fresh_box`` of the slim image: for tests busybox serves, its disks (exported,
    imported, pulled) are a fifth of the default image's."""
    async for box in _fresh(rt, request, boxvm.BoxOptions(image="boxvm/slim")):
        yield box


async def _fresh(
    rt: boxvm.Runtime, request: pytest.FixtureRequest, options: boxvm.BoxOptions
) -> AsyncIterator[boxvm.Box]:
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60] + "-" + os.urandom(2).hex()
    box = await rt.create(options, name=name)
    yield box
    if await rt.get(box.id) is not None:
        await rt.remove(box.id, force=True)
