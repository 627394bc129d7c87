"""Blocking mirror of the async API, derived mechanically from it.

Every coroutine method of ``boxvm.Runtime``, ``Box`` and ``Process`` gets a blocking
twin here that runs it on one private event-loop thread; results that are async
objects come back wrapped in their blocking twins. Nothing is written twice, so the
two APIs cannot drift apart (a test checks that every public async method has a twin).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

from boxvm import runtime as aio
from boxvm.options import BoxInfo, BoxOptions, ExecResult

__all__ = ["Box", "BoxInfo", "BoxOptions", "ExecResult", "ImageHandle", "Process", "Runtime", "SnapshotHandle"]

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="boxvm-sync", daemon=True).start()
            atexit.register(_loop.call_soon_threadsafe, _loop.stop)
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()


class _StreamIter:
    """A blocking iterator over an async byte stream."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        async def step() -> bytes | None:
            try:
                return await self._stream.__anext__()
            except StopAsyncIteration:
                return None

        chunk = _run(step())
        if chunk is None:
            raise StopIteration
        return chunk


class _Mirror:
    _async: Any

    def __getattr__(self, name: str) -> Any:  # plain attributes: id, name, exit_code, ...
        return getattr(self._async, name)

    def __repr__(self) -> str:
        return repr(self._async)


class Process(_Mirror):
    def __init__(self, proc: aio.Process) -> None:
        self._async = proc
        self.stdout = _StreamIter(proc.stdout)
        self.stderr = _StreamIter(proc.stderr)


class SnapshotHandle(_Mirror):
    def __init__(self, handle: aio.SnapshotHandle) -> None:
        self._async = handle


class Box(_Mirror):
    def __init__(self, box: aio.Box) -> None:
        self._async = box
        self.snapshot = SnapshotHandle(box.snapshot)


class ImageHandle(_Mirror):
    def __init__(self, handle: aio.ImageHandle) -> None:
        self._async = handle


class Runtime(_Mirror):
    def __init__(self, home: str | None = None, *, _runtime: aio.Runtime | None = None) -> None:
        async def make() -> aio.Runtime:
            return aio.Runtime(home)

        self._async = _runtime or _run(make())
        self.images = ImageHandle(self._async.images)

    @classmethod
    def remote(cls, url: str, token: str | None = None) -> Runtime:
        async def make() -> aio.Runtime:
            return aio.Runtime.remote(url, token)

        return cls(_runtime=_run(make()))

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TWINS: dict[type, type] = {
    aio.Runtime: Runtime,
    aio.Box: Box,
    aio.Process: Process,
    aio.SnapshotHandle: SnapshotHandle,
    aio.ImageHandle: ImageHandle,
}


def _wrap(value: Any) -> Any:
    twin = _TWINS.get(type(value))
    if twin is not None:
        return twin(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _blocking(name: str, method: Any) -> Any:
    @functools.wraps(method)
    def call(self: _Mirror, *args: Any, **kwargs: Any) -> Any:
        return _wrap(_run(getattr(self._async, name)(*args, **kwargs)))

    return call


for _async_cls, _sync_cls in _TWINS.items():
    for _name, _method in inspect.getmembers(_async_cls, inspect.iscoroutinefunction):
        if not _name.startswith("_"):
            setattr(_sync_cls, _name, _blocking(_name, _method))
