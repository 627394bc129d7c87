"""Typed QMP: every command boxvm sends to QEMU, and nothing else.

The supervisor is the only user of a box's monitor. Each command is a method here with
its arguments spelled out, so the set of things boxvm asks of QEMU is this file and a
caller cannot pass an arbitrary command through. ``qemu.qmp`` does the protocol (greeting,
capabilities negotiation, ids, events); this module adds the types and translates every
failure into a :class:`QMPCommandError`, an :class:`EngineError` that keeps the command
and QEMU's reply for the log. Its message names QEMU's error without host paths, since it
may travel to a REST caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from boxvm.errors import EngineError

QUIT_TIMEOUT = 5.0  # QEMU exits at once; the supervisor kills it if not
_PATH = re.compile(r"/[^\s'\",:]+")
_MIGRATION_FD = "boxvm-migration"
_INCOMING_FD = "boxvm-incoming"


def without_paths(text: str) -> str:
    """QEMU's message with every host path cut to its last component (it may reach a REST caller)."""
    return _PATH.sub(lambda m: m.group(0).rsplit("/", 1)[-1], text)


class QMPCommandError(EngineError):
    """QEMU refused a command or never answered it.

    ``reply`` is QEMU's error object (``{"class": ..., "desc": ...}``), or None when the
    monitor went away before answering (the VM exited)."""

    def __init__(self, command: str, arguments: dict[str, Any] | None, reply: dict[str, Any] | None) -> None:
        self.command = command
        self.arguments = arguments
        self.reply = reply
        if reply is None:
            message = f"QEMU did not answer {command!r}: its monitor closed (the VM exited)"
        else:
            desc = without_paths(str(reply.get("desc", "")))
            message = f"QEMU refused {command!r} ({reply.get('class', 'error')}): {desc}"
        super().__init__(message)

    @property
    def error_class(self) -> str | None:
        return None if self.reply is None else str(self.reply.get("class"))


class QMP:
    """One QEMU monitor connection with a typed method per command boxvm uses."""

    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)

    async def connect(self, socket: Path) -> None:
        try:
            await self._client.connect(str(socket))
        except QMPError as exc:
            raise EngineError(f"could not connect to QEMU's monitor: {exc}") from exc

    async def disconnect(self) -> None:
        await self._client.disconnect()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """QEMU's events, in order (``qemu.qmp`` queues them until consumed)."""
        async for event in self._client.events:
            yield dict(event)

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[Events]:
        """QEMU's events of these names, queued from now until the block ends (besides
        :meth:`events`, which sees every event)."""
        with self._client.listener(names) as listener:
            yield Events(listener)

    async def _run(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QMPCommandError(command, arguments, dict(exc.received["error"])) from exc
        except QMPError as exc:  # interrupted, not connected, protocol failure
            raise QMPCommandError(command, arguments, None) from exc

    # -- run state --------------------------------------------------------------------
    async def status(self) -> str:
        """The VM's run state: ``running``, ``paused``, ``prelaunch``, ``inmigrate``, ..."""
        return str((await self._run("query-status"))["status"])

    async def stop(self) -> None:
        """Pause the vCPUs (QEMU's ``stop``; the box's *pause*)."""
        await self._run("stop")

    async def cont(self) -> None:
        """Resume the vCPUs."""
        await self._run("cont")

    async def quit(self) -> None:
        """Make QEMU exit now (bounded: a wedged QEMU is killed by its caller)."""
        try:
            await asyncio.wait_for(self._run("quit"), QUIT_TIMEOUT)
        except TimeoutError as exc:
            raise QMPCommandError("quit", None, None) from exc

    # -- block graph ------------------------------------------------------------------
    async def blockdev_add_qcow2(self, node: str, filename: Path) -> None:
        """Open a qcow2 file as a new node without a backing (a capture's fresh overlay)."""
        file_node = {"driver": "file", "filename": str(filename)}
        args = {"driver": "qcow2", "node-name": node, "discard": "unmap", "file": file_node, "backing": None}
        await self._run("blockdev-add", args)

    async def blockdev_del(self, node: str) -> None:
        await self._run("blockdev-del", {"node-name": node})

    async def snapshot(self, node: str, overlay: str) -> None:
        """Make ``overlay`` the top over ``node`` atomically (one transaction): from the
        moment it returns, ``node`` is never written again."""
        action = {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}
        await self._run("transaction", {"actions": [action]})

    async def backing_node(self, node: str) -> str | None:
        """The node-name of ``node``'s backing child, if it has one."""
        graph = await self._run("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        ids = {name: i for i, name in names.items()}
        below = [e["child"] for e in graph["edges"] if e["parent"] == ids.get(node) and e["name"] == "backing"]
        return names[below[0]] if below else None

    async def block_stream(self, job: str, device: str, base_node: str, backing_file: str | None) -> None:
        """Start copying the layers between ``device`` and ``base_node`` up into ``device``
        (a background job; it stays until :meth:`job_dismiss`)."""
        args = {"job-id": job, "device": device, "base-node": base_node, "auto-dismiss": False}
        if backing_file is not None:
            args["backing-file"] = backing_file
        await self._run("block-stream", args)

    async def job(self, job: str) -> dict[str, Any] | None:
        """A job's ``query-jobs`` entry (``status``, and ``error`` if it failed)."""
        return next((j for j in await self._run("query-jobs") if j["id"] == job), None)

    async def job_dismiss(self, job: str) -> None:
        await self._run("job-dismiss", {"id": job})

    # -- migration (memory state) -----------------------------------------------------
    async def migrate_set_capabilities(self, capabilities: dict[str, bool]) -> None:
        caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
        await self._run("migrate-set-capabilities", {"capabilities": caps})

    async def migrate_set_parameters(self, parameters: dict[str, Any]) -> None:
        await self._run("migrate-set-parameters", parameters)

    async def migrate_to_fd(self, fd: int) -> None:
        """Start an outgoing migration (returns at once; poll :meth:`query_migrate`) into
        the open file ``fd`` (``memory.StateFile``), from its current offset.
        QEMU 7.2 has no ``file:`` URI: the descriptor is handed over (``getfd``, then
        ``fd:``), so QEMU writes the file itself, without the shell and the pipe of
        ``exec:cat``. QEMU's copy shares the caller's file offset (one open file), which
        shows where the stream ended; the migration closes its copy when it ends."""
        await self._migrate_through(fd, _MIGRATION_FD, "migrate")

    async def _migrate_through(self, fd: int, name: str, command: str) -> None:
        """Hand ``fd`` to QEMU as ``name`` (``getfd``) and run the migration ``command`` on
        ``fd:name``. A refused command leaves the descriptor with the monitor, holding the
        file until QEMU exits: it is given back."""
        try:
            self._client.send_fd_scm(fd)
        except (OSError, AssertionError, QMPError) as exc:  # qemu.qmp asserts it is connected
            raise QMPCommandError("getfd", {"fdname": name}, None) from exc
        await self._run("getfd", {"fdname": name})
        try:
            await self._run(command, {"uri": f"fd:{name}"})
        except QMPCommandError:
            with contextlib.suppress(QMPCommandError):
                await self._run("closefd", {"fdname": name})
            raise

    async def save_devices(self, path: Path) -> None:
        """Write the device state alone, no RAM at all, into ``path`` (returns when written;
        the VM keeps its run state and its block devices stay active). QEMU 7.2's only way
        to leave out a RAM block mapped ``share=off``, which ``x-ignore-shared`` does not
        skip, is ``xen-save-devices-state`` (it works with any accelerator). It opens the
        path itself (``O_TRUNC``): create the file first, with the mode it must keep. A
        descriptor through ``add-fd`` would stay open in QEMU while the VM is stopped (7.2
        closes a removed fdset's descriptors only while it runs). The stream has no
        configuration section: whoever loads it is started with ``-global
        migration.send-configuration=off`` (``memory.has_configuration``)."""
        await self._run("xen-save-devices-state", {"filename": str(path), "live": False})

    async def migrate_incoming_from(self, path: Path) -> None:
        """Start loading the saved state in ``path`` into a QEMU started with ``-incoming
        defer``, handed over as a descriptor (``getfd``, then ``fd:``): ``exec:cat`` would need
        QEMU to run a program, which its sandbox (``-sandbox spawn=deny``) refuses."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._migrate_through(fd, _INCOMING_FD, "migrate-incoming")
        finally:
            os.close(fd)  # QEMU holds its own copy (or none: refused)

    async def migrate_continue(self, state: str) -> None:
        """Let a migration paused in ``state`` (``pre-switchover``) go on."""
        await self._run("migrate-continue", {"state": state})

    async def migrate_cancel(self) -> None:
        await self._run("migrate_cancel")

    async def query_migrate(self) -> dict[str, Any]:
        """The migration's ``status`` (``active``, ``completed``, ``failed``, ...) and figures."""
        return dict(await self._run("query-migrate"))


class Events:
    """A queue of some of QEMU's events (:meth:`QMP.listen`)."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def next(self, timeout: float) -> dict[str, Any]:
        """The next event; TimeoutError if none comes within ``timeout`` seconds."""
        return dict(await asyncio.wait_for(self._listener.get(), timeout))
