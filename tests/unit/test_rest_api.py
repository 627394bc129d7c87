"""The REST API without a VM: authentication, the error envelope and its mapping back to
classes in the client, idempotency keys, version checks and the committed OpenAPI document.

In-process against the real app ``boxvm serve`` builds (``httpx.ASGITransport``), over a
fresh home in ``tmp_path``: no guest bundle, no image, no QEMU. Boxes that are needed are
configured records (an image build is not needed to name, stop or snapshot-look-up one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

import boxvm
from boxvm import errors, migrate, templates, wire
from boxvm.backends.local import LocalBackend
from boxvm.backends.remote import RemoteBackend
from boxvm.options import TemplateInfo
from boxvm.paths import Home
from boxvm.server.app import Idempotency
from boxvm.state import clones
from boxvm.status import RULES, Operation
from boxvm.store import BoxRecord
from tests.helpers import InProcess, in_process

REPO = Path(__file__).resolve().parents[2]
TOKEN = "unit-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[InProcess]:
    async with in_process(tmp_path / "home", TOKEN) as served:
        yield served


def configured_box(api: InProcess, name: str) -> str:
    """A box record as ``create`` leaves it, without its disks (nothing here reads them)."""
    box_id = secrets.token_hex(16)
    status, mac = boxvm.BoxStatus.CONFIGURED, "52:54:00:00:00:01"
    api.backend.store.insert_box(BoxRecord(id=box_id, name=name, status=status, image="x", options={}, mac=mac))
    return box_id


def concrete(path: str) -> str:
    return path.replace("{box}", "some-box").replace("{name}", "some-snap").replace("{template}", "0" * 16)


async def test_every_route_needs_the_token(api: InProcess) -> None:
    routes = [(m.upper(), concrete(p)) for p, ops in api.app.openapi()["paths"].items() for m in ops]
    assert len(routes) > 20
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        for method, path in routes:
            r = await api.http.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"] | {"message": ""} == {
                "type": "Unauthorized", "code": "Unauthorized", "message": "", "status": 401,
            }  # fmt: skip
    assert (await api.http.get("/v1/boxes", headers=AUTH)).status_code == 200
    bad = api.client("wrong")
    with pytest.raises(boxvm.Unauthorized):
        await bad.list()
    await bad.close()


async def test_errors_carry_their_class_and_status(api: InProcess) -> None:
    cfg = configured_box(api, "cfg")
    nonce, imp = secrets.token_hex(16), "/v1/boxes/import?"
    api.http.headers.update(AUTH)
    cases = [
        ("GET", "/v1/boxes/nope", None, 404, "NotFound", "BoxNotFound"),
        ("GET", "/v1/boxes/nope/snapshots/s", None, 404, "NotFound", "BoxNotFound"),
        ("GET", "/v1/boxes/cfg/snapshots/s", None, 404, "NotFound", "SnapshotNotFound"),
        ("POST", "/v1/boxes/cfg/snapshots/s/restore", None, 404, "NotFound", "SnapshotNotFound"),
        ("GET", "/v1/no-such-route", None, 404, "NotFound", "NotFound"),
        ("POST", "/v1/boxes/cfg/stop", None, 409, "InvalidState", "InvalidState"),
        ("POST", "/v1/boxes", {"name": "cfg"}, 409, "AlreadyExists", "AlreadyExists"),
        ("POST", "/v1/boxes", {"name": "../evil"}, 400, "InvalidArgument", "InvalidArgument"),
        ("POST", "/v1/boxes", {"options": {"cpus": "many"}}, 400, "InvalidArgument", "InvalidArgument"),
        ("POST", "/v1/boxes/import", None, 422, "ArchiveError", "ArchiveError"),  # an empty upload
        # the id a migrating box keeps: never a path, never one taken (checked before the upload is read)
        ("POST", f"{imp}box_id=..%2F..%2Fetc&nonce={nonce}", None, 400, "InvalidArgument", "InvalidArgument"),
        ("POST", f"{imp}box_id={cfg.upper()}&nonce={nonce}", None, 400, "InvalidArgument", "InvalidArgument"),
        ("POST", f"{imp}box_id={cfg}&nonce={nonce}", None, 409, "AlreadyExists", "AlreadyExists"),
    ]
    for method, path, body, status, kind, code in cases:
        r = await api.http.request(method, path, json=body)
        assert r.status_code == status, (method, path, r.text)
        assert r.json()["error"]["type"] == kind and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["status"] == status
    r = await api.http.post("/v1/boxes", json={"options": {"cpus": "many"}})
    assert "cpus" in r.json()["error"]["message"]
    for malformed in (b'{"name": ', b"[1, 2]", b'"text"', b"\xff\xfe"):
        r = await api.http.post("/v1/boxes", content=malformed, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument", (malformed, r.text)


async def test_the_client_raises_the_servers_classes(api: InProcess) -> None:
    box_id = configured_box(api, "cfg")
    client = api.client(TOKEN)
    try:
        assert await client.get("nope") is None
        assert (await client.get("cfg")).id == box_id  # type: ignore[union-attr]
        assert await client.snapshot_get(box_id, "missing") is None  # a box without that snapshot
        for missing_box in ("nope", "snapshot-x"):  # (matching "snapshot" in the message took the 2nd for None)
            with pytest.raises(errors.BoxNotFound):
                await client.snapshot_get(missing_box, "missing")  # no box at all: not "no snapshot"
        with pytest.raises(errors.SnapshotNotFound):
            await client.snapshot_restore(box_id, "missing")
        with pytest.raises(errors.InvalidState, match="not running"):
            await client.stop(box_id, 1)
        with pytest.raises(errors.AlreadyExists):
            await client.create(boxvm.BoxOptions(), "cfg")
        with pytest.raises(errors.BoxNotFound):
            await client.remove("nope", False)
        await client.remove(box_id, False)
        assert await client.list() == []
    finally:
        await client.close()


def test_error_envelopes_round_trip_by_class_and_stay_readable_by_older_peers() -> None:
    classes = list(errors.KINDS.values())
    assert errors.BoxNotFound in classes and errors.SnapshotNotFound in classes and len(classes) >= 14
    top_level = {c.__name__ for c in errors.BoxvmError.__subclasses__()} | {"BoxvmError"}
    for cls in classes:
        exc = cls("a message that names no class")
        envelope = json.loads(json.dumps(exc.to_dict()))
        back = errors.from_dict(envelope)
        assert type(back) is cls and back.message == exc.message
        assert envelope["status"] == cls.http_status and envelope["code"] == cls.__name__
        # "type" is the top-level class, as API 1 always sent: a client without codes maps it
        assert envelope["type"] in top_level and isinstance(back, type(errors.from_dict({"type": envelope["type"]})))
    assert type(errors.from_dict({"type": "NotFound", "message": "m"})) is errors.NotFound  # an older server
    assert type(errors.from_dict({"type": "Nonsense", "code": "AlsoNonsense", "message": "m"})) is errors.BoxvmError


async def test_idempotency_replays_a_stored_success_and_refuses_a_changed_request(api: InProcess) -> None:
    api.http.headers.update(AUTH)
    key = os.urandom(8).hex()
    body = wire.CreateRequest(name="t-idem")
    stored = json.dumps({"id": "a" * 32, "name": "t-idem"})
    api.backend.store.put_response("POST /v1/boxes", key, Idempotency.fingerprint(body), 201, stored)

    r = await api.http.post("/v1/boxes", json=wire.body(body), headers={wire.IDEMPOTENCY_HEADER: key})
    assert r.status_code == 201 and r.text == stored and r.headers["Idempotent-Replayed"] == "true"
    assert await api.backend.list() == []  # replayed, not run

    r = await api.http.post("/v1/boxes", json={"name": "t-other"}, headers={wire.IDEMPOTENCY_HEADER: key})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]["message"]

    # the same key on another route is another request; failures are not stored, so they run again
    for _ in range(2):
        r = await api.http.post("/v1/boxes/import", content=b"junk", headers={wire.IDEMPOTENCY_HEADER: key})
        assert r.status_code == 422 and "Idempotent-Replayed" not in r.headers, r.text
    for bad in ("", "k" * 201):
        r = await api.http.post("/v1/boxes", json={"name": "t-x"}, headers={wire.IDEMPOTENCY_HEADER: bad})
        assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]["message"]


def plant_template(api: InProcess, image: str) -> TemplateInfo:
    """A template as ``templates.adopt`` records it (its record only: listing and removal
    read nothing else; a resume of it is tests/vm/test_templates.py's)."""
    info = TemplateInfo(secrets.token_hex(8), image, "sha256:" + "1" * 64, "bundle", 1, 256, "nat", 4, 1.0, 4096)
    path = templates.root(api.backend.home) / info.id
    path.mkdir(parents=True)
    (path / templates.INFO).write_text(json.dumps(dataclasses.asdict(info)))
    return info


async def test_templates_are_listed_and_removed_over_rest_and_hostile_requests_are_refused(api: InProcess) -> None:
    api.http.headers.update(AUTH)
    assert (await api.http.get("/v1/templates")).json() == []
    home = str(api.backend.home.root)
    named = plant_template(api, "docker.io/library/alpine:3.20")
    local_path = plant_template(api, f"{home}/images/private-layout")  # a server path is never shown
    client = api.client(TOKEN)
    try:
        listed = {t.id: t for t in await client.template_list()}
        assert listed[named.id] == named
        assert listed[local_path.id].image == "<server path>" and home not in (await api.http.get("/v1/templates")).text
        await client.template_remove(named.id)
        assert [t.id for t in await client.template_list()] == [local_path.id]
        with pytest.raises(errors.NotFound, match="no template"):
            await client.template_remove(named.id)
        for bad in ("../../etc", "0" * 15, "0" * 17, "ABCDEF0123456789", "0" * 16 + "\n", "x" * 5000):
            with pytest.raises(errors.InvalidArgument, match="16 hex digits"):  # refused before it is sent
                await client.template_remove(bad)
    finally:
        await client.close()
    for path, status, kind in [
        (f"/v1/templates/{'0' * 16}", 404, "NotFound"),
        ("/v1/templates/ABCDEF0123456789", 400, "InvalidArgument"),
        ("/v1/templates/..%2F..%2Fboxes", 404, "NotFound"),  # decoded before routing: no route matches
        (f"/v1/templates/{'a' * 4096}", 400, "InvalidArgument"),
        ("/v1/templates/..", 404, "NotFound"),  # not a route: the client normalises it away
    ]:
        r = await api.http.delete(path)
        assert (r.status_code, r.json()["error"]["type"]) == (status, kind), (path, r.text)
        assert len(r.text) < 600 and home not in r.text
    assert (templates.root(api.backend.home) / local_path.id).is_dir()  # none of them removed anything
    for body, needle in [
        ({"options": {"cpus": "many"}}, "cpus"),
        ({"options": {"memory_mib": 1 << 30}}, "memory_mib"),
        ({"options": {"network": "host"}}, "network"),
        ({"options": {"image": "x" * 5000}}, "image"),
        ({"options": {"image": "/etc"}}, "registry reference"),  # the server's files: one fixed refusal
        ({"options": {"image": f"{home}/images"}}, "registry reference"),
        ({"options": []}, "options"),
    ]:
        r = await api.http.post("/v1/templates", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument", (body, r.text)
        assert needle in r.json()["error"]["message"] and home not in r.text, r.text
    assert await api.backend.list() == []  # no box was made for a refused template


async def test_openapi_document_is_served_and_committed(api: InProcess) -> None:
    served = (await api.http.get("/v1/openapi.json", headers=AUTH)).json()
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == committed, "regenerate it: python -m boxvm.server.openapi > docs/openapi.json"
    assert "/v1/boxes/{box}/export" in served["paths"] and "/v1/boxes/import" in served["paths"]
    assert set(served["paths"]["/v1/templates"]) == {"get", "post"} and "/v1/templates/{template}" in served["paths"]


async def test_server_config_is_the_protocol_module(api: InProcess) -> None:
    r = await api.http.get("/v1/config", headers=AUTH)
    capabilities = [*wire.CAPABILITIES, wire.MIGRATION_CAPABILITY, wire.LEASE_CAPABILITY]
    assert r.json() == {"version": boxvm.__version__, "api": wire.API_VERSION, "capabilities": capabilities}


async def test_client_refuses_an_older_server() -> None:
    old = FastAPI()

    @old.get("/v1/config")
    async def config() -> dict[str, object]:
        return {"version": "0.0.1", "api": 0, "capabilities": ["lifecycle"]}

    client = RemoteBackend("http://127.0.0.1", "t", transport=httpx.ASGITransport(app=old))
    try:
        with pytest.raises(boxvm.Unsupported, match=r"0\.0\.1.*API 0.*upgrade the server"):
            await client.list()
    finally:
        await client.close()


def _record(backend: LocalBackend, name: str, box_id: str, options: dict[str, object] | None = None) -> None:
    status, mac = boxvm.BoxStatus.STOPPED, "52:54:00:00:00:02"
    backend.store.insert_box(BoxRecord(id=box_id, name=name, status=status, image="x", options=options or {}, mac=mac))


async def test_a_migration_adopts_only_its_own_import_never_a_box_a_caller_put_under_its_id(
    api: InProcess, tmp_path: Path
) -> None:
    """A REST caller on the target who can list the source imports any archive under the
    moving box's id: the move refuses to begin, or stops with the box kept where it is
    (the source's copy, or the object of the bucket way), and adopts only the box its own
    import marked with the journal's nonce."""
    source, target = LocalBackend(Home.default(tmp_path / "source")), api.client(TOKEN)
    folder = tmp_path / "source" / "migrations"
    try:
        mover = secrets.token_hex(16)
        _record(source, "mover", mover)
        _record(api.backend, "decoy", mover)  # imported there under the mover's id, another name
        with pytest.raises(boxvm.AlreadyExists, match="id of 'mover'"):
            await migrate.migrate(source, "mover", target)
        assert (await source.get("mover")) is not None and not (folder / "mover.json").exists()
        # begun before the decoy came, with the same name even: neither way adopts it
        await api.backend.remove(mover, True)
        _record(api.backend, "mover", mover, {"migration": secrets.token_hex(16)})
        nonce = secrets.token_hex(16)  # one move's: the source holds the box for it (its lease)
        for obj, phase in (("", "started"), ("s3://bucket/p/mover-1.boxsnap", "released")):
            journal = migrate.Journal(mover, "mover", target.url, obj, phase, nonce=nonce)
            migrate._save(folder / "mover.json", journal)
            with pytest.raises(boxvm.AlreadyExists, match="not imported by this migration"):
                await migrate.migrate(source, "mover", target, via="s3://bucket/p/" if obj else None)
            assert migrate._load(folder / "mover.json") == journal  # the object, named in it, is not deleted
        assert (await source.get("mover")) is not None
        # the move's own import (an answer lost, or a retried upload refused as a duplicate): adopted
        await api.backend.remove(mover, True)
        _record(api.backend, "mover", mover, {"migration": journal.nonce})
        migrate._save(folder / "mover.json", dataclasses.replace(journal, object="", phase="started"))
        moved = await migrate.migrate(source, "mover", target)
        assert moved.id == mover and moved.migration == journal.nonce
        assert (await source.get(mover)) is None and not (folder / "mover.json").exists()
    finally:
        await target.close()
        await source.close()


async def test_a_migration_journaled_before_nonces_past_its_import_finishes(api: InProcess, tmp_path: Path) -> None:
    """A journal an older boxvm wrote (no nonce) after the target's import: its box there has
    no nonce either; the re-run adopts it (and removes the source's copy if still there),
    never a box under its id and name that another move marked."""
    source, target = LocalBackend(Home.default(tmp_path / "source")), api.client(TOKEN)
    path = tmp_path / "source" / "migrations" / "mover.json"
    path.parent.mkdir(parents=True)
    try:
        for phase in ("imported", "released"):
            mover = secrets.token_hex(16)
            if phase == "imported":  # the source's copy is removed after this step
                _record(source, "mover", mover)
            _record(api.backend, "mover", mover)  # what the old version's import left: no nonce
            migrate._save(path, migrate.Journal(mover, "mover", target.url, "", phase))
            moved = await migrate.migrate(source, "mover", target)
            assert moved.id == mover and moved.migration is None, phase
            assert await source.get(mover) is None and not path.exists()
            await api.backend.remove(mover, True)
        _record(api.backend, "mover", mover, {"migration": secrets.token_hex(16)})
        journal = migrate.Journal(mover, "mover", target.url, "", "released")
        migrate._save(path, journal)
        with pytest.raises(boxvm.BoxNotFound, match="vanished from the target"):
            await migrate.migrate(source, "mover", target)
        assert migrate._load(path) == journal  # no nonce made up past the import
    finally:
        await target.close()
        await source.close()


def test_a_clone_of_a_migrated_box_carries_no_migration_nonce() -> None:
    """The nonce marks the import of one box: a clone that kept it would be that import to a
    move re-run with its journal."""
    options = {"memory_mib": 256, "migration": secrets.token_hex(16)}
    status, mac = boxvm.BoxStatus.STOPPED, "52:54:00:00:00:03"
    src = BoxRecord(id=secrets.token_hex(16), name="m", status=status, image="x", options=options, mac=mac)
    made = clones._clone_record(src, secrets.token_hex(16), "c", {}, None)
    assert made.options == {"memory_mib": 256} and src.options["migration"]


async def test_rest_import_takes_a_box_id_only_with_a_migration_nonce(api: InProcess) -> None:
    api.http.headers.update(AUTH)
    box_id, nonce = secrets.token_hex(16), secrets.token_hex(16)
    for params in ({"box_id": box_id}, {"nonce": nonce}, {"box_id": box_id, "nonce": "x" * 32}):
        r = await api.http.post("/v1/boxes/import", params=params, content=b"")
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument", (params, r.text)
    for body in ({"box_id": box_id}, {"nonce": nonce}, {"box_id": box_id, "nonce": nonce.upper()}):
        r = await api.http.post("/v1/boxes/import-object", json={"url": "s3://b/k.boxsnap", **body})
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument", (body, r.text)
    assert await api.backend.list() == []


async def test_a_migration_to_a_server_that_cannot_keep_the_id_is_refused_before_it_begins(tmp_path: Path) -> None:
    old = FastAPI()

    @old.get("/v1/config")
    async def config() -> dict[str, object]:
        return {"version": "0.1.0", "api": wire.API_VERSION, "capabilities": list(wire.CAPABILITIES)}

    source = LocalBackend(Home.default(tmp_path / "source"))
    target = RemoteBackend("http://127.0.0.1", "t", transport=httpx.ASGITransport(app=old))
    try:
        _record(source, "mover", secrets.token_hex(16))
        with pytest.raises(boxvm.Unsupported, match="cannot keep a migrating box's id: upgrade it"):
            await migrate.migrate(source, "mover", target)
        assert not (tmp_path / "source" / "migrations" / "mover.json").exists()
    finally:
        await target.close()
        await source.close()


async def test_a_retried_upload_refused_as_a_duplicate_is_the_moves_own_import(api: InProcess, tmp_path: Path) -> None:
    """The target committed the first upload and restarted before it answered; the client's
    retry is refused (the id is taken): the move finds its own import there and goes on."""

    class Retried(RemoteBackend):
        async def import_stream(self, archive, name, untrusted, label, box_id=None, nonce=None):  # type: ignore[no-untyped-def]
            assert box_id is not None and name is not None
            _record(api.backend, name, box_id, {"migration": nonce})  # the first attempt's commit
            # the retry (its body never read: the server refuses the taken id first)
            return await super().import_stream(_empty, name, untrusted, label, box_id, nonce)

    async def _empty() -> AsyncIterator[bytes]:
        yield b""

    source = LocalBackend(Home.default(tmp_path / "source"))
    target = Retried("http://127.0.0.1", TOKEN, transport=httpx.ASGITransport(app=api.app))
    try:
        mover = secrets.token_hex(16)
        _record(source, "mover", mover)
        moved = await migrate.migrate(source, "mover", target)
        assert moved.id == mover and moved.name == "mover" and await source.get(mover) is None
    finally:
        await target.close()
        await source.close()


async def test_a_box_is_held_for_one_move_and_released_only_by_it(api: InProcess, tmp_path: Path) -> None:
    """The source holds a box for one move (its lease): another move is refused before it
    begins and leaves no journal; the source learns a value derived from the nonce, never
    the nonce; a release comes from the home that began the move, for its own target and
    hold, before the target took the box; from elsewhere it needs ``force``. Over REST, the
    same holds for the source's routes."""
    source, target = LocalBackend(Home.default(tmp_path / "source")), api.client(TOKEN)
    folder = tmp_path / "source" / "migrations"
    try:
        box = secrets.token_hex(16)
        _record(source, "held", box)
        elsewhere = secrets.token_hex(32)  # a move driven from another home holds it
        await source.lease(box, elsewhere)
        with pytest.raises(boxvm.InvalidState, match="being moved by another migration"):
            await migrate.migrate(source, "held", target)
        assert not (folder / "held.json").exists() and (await api.backend.get("held")) is None
        with pytest.raises(boxvm.InvalidState, match="driven from elsewhere"):
            await migrate.release(source, "held", target)
        await migrate.release(source, "held", target, force=True)
        # This home's move, begun and stopped at its start (its export refused, say): the
        # source holds the box by the journal's nonce, through a value derived from it.
        journal = migrate.Journal(box, "held", target.url, "", "started", nonce=secrets.token_hex(16))
        migrate._save(folder / "held.json", journal)
        await migrate._hold(source, target, folder / "held.json", journal, False)
        holder = source.store.lease_of(box)
        assert holder == migrate._holder(journal.nonce) and journal.nonce not in holder
        with pytest.raises(boxvm.InvalidState, match="being moved to"):  # for its own target only
            await migrate.release(source, "held", RemoteBackend("http://127.0.0.1:1", "t"))
        await migrate.release(source, "held", target)
        assert not (folder / "held.json").exists() and source.store.lease_of(box) is None
        # A journal whose move never held the box (another took it first, between the
        # journal and the lease): migrate again is refused and keeps it; release forgets it,
        # and the other move keeps its hold.
        await source.lease(box, elsewhere)
        late = migrate.Journal(box, "held", target.url, "", "started", nonce=secrets.token_hex(16))
        migrate._save(folder / "held.json", late)
        with pytest.raises(boxvm.InvalidState, match="being moved by another migration"):
            await migrate.migrate(source, "held", target)
        assert migrate._load(folder / "held.json") == late
        await migrate.release(source, "held", target)
        assert not (folder / "held.json").exists() and source.store.lease_of(box) == elsewhere
        # --force, the journal's target gone for good: this home's journal and whichever hold go.
        migrate._save(folder / "held.json", late)
        await migrate.release(source, "held", RemoteBackend("http://127.0.0.1:1", "t"), force=True)
        assert not (folder / "held.json").exists() and source.store.lease_of(box) is None
        # Over REST: the holder is checked, a wrong one is refused, only the holder releases.
        served = api.backend
        _record(served, "remote-held", secrets.token_hex(16))
        await target.lease("remote-held", elsewhere)
        with pytest.raises(boxvm.InvalidState):
            await target.lease("remote-held", secrets.token_hex(32))
        with pytest.raises(boxvm.InvalidState):
            await target.release_lease("remote-held", secrets.token_hex(32))
        with pytest.raises(boxvm.InvalidArgument):
            await target.lease("remote-held", "x" * 10_000)
        await target.release_lease("remote-held", elsewhere)
        await target.lease("remote-held", secrets.token_hex(32))  # free again
    finally:
        await target.close()
        await source.close()


async def test_a_held_box_is_exported_and_removed_only_by_its_move(api: InProcess, tmp_path: Path) -> None:
    """While a move holds a box, what would take it from its host (export, removal) is
    refused to everyone but that move, so a second driver (one that takes no lease too)
    cannot give the box a second owner; a free box is not taken while it exports (that
    export may be another driver's move). Locally and over REST."""
    local, remote = LocalBackend(Home.default(tmp_path / "source")), api.client(TOKEN)
    holder, other = secrets.token_hex(32), secrets.token_hex(32)
    try:
        for backend, served in ((local, local), (remote, api.backend)):
            box = secrets.token_hex(16)
            _record(served, "held", box)
            await backend.lease(box, holder)
            moving = "a migration is moving it"
            for who in (None, other):
                for force in (False, True):
                    with pytest.raises(boxvm.InvalidState, match=moving):
                        await backend.remove(box, force, who)
                with pytest.raises(boxvm.InvalidState, match=moving):
                    stream = await backend.export_stream(box, boxvm.ExportOptions(), who)
                    await anext(aiter(stream))
            assert await backend.get(box) is not None and served.store.lease_of(box) == holder
            await backend.remove(box, False, holder)  # the move's own removal
            assert await backend.get(box) is None
            # A free box exporting (no lease taken for it) is not taken; once it is over, it is.
            box = secrets.token_hex(16)
            _record(served, "exporting", box)
            assert served.store.begin_operation(box, Operation.EXPORT, RULES[Operation.EXPORT].allowed, os.getpid())
            with pytest.raises(boxvm.InvalidState, match="being exported"):
                await backend.lease(box, holder)
            served.store.end_operation(box)
            await backend.lease(box, holder)
            await backend.lease(box, holder)  # its own again: idempotent
            assert served.store.begin_operation(box, Operation.EXPORT, RULES[Operation.EXPORT].allowed, 0, holder)
            await backend.lease(box, holder)  # ... also while its own export runs
            served.store.end_operation(box)
            with pytest.raises(boxvm.InvalidArgument):  # a holder is 64 hex digits, also where presented
                await backend.remove(box, False, "x" * 10_000)
            await backend.release_lease(box, holder)
            await backend.remove(box, False)
    finally:
        await remote.close()
        await local.close()
