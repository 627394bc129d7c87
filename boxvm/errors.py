"""The one error hierarchy of boxvm.

    BoxvmError
     ├── InvalidArgument   400  bad name, option or argument
     ├── NotFound          404  no such box, image or path
     │    ├── BoxNotFound         no box with that id or name
     │    └── SnapshotNotFound    the box has no snapshot of that name
     ├── AlreadyExists     409  name taken
     ├── InvalidState      409  operation not allowed in the box's current status
     ├── QuiesceError      409  guest filesystem could not be frozen
     ├── ImageError        422  image missing, unreadable or unsafe
     ├── ArchiveError      422  corrupt, unsupported or unsafe archive
     ├── EngineError       503  QEMU or the guest agent failed
     ├── StorageError      507  the host disk failed or is full
     ├── Unauthorized      401  REST token missing or wrong
     └── Unsupported       501  the server lacks an API version or capability

Every class has a stable ``http_status``, a ``code`` naming its top-level class (what the
CLI prints, and the envelope's ``type`` since API 1) and a ``kind``, its own name. A REST
server sends ``{type, code, message, status}`` (``code`` being the kind) and a client raises
the very same class again, by ``code`` when it knows it, else by ``type`` (an older peer):
never by looking at the message. Foreign exceptions are translated at the boundary with
``raise X(...) from exc``.
"""

from __future__ import annotations

import re

# Terminal control characters (escape sequences retitle, clear or rewrite a screen), all but
# newline and tab; invisible and bidirectional formatting (text shown other than it reads);
# lone surrogates (no encoder takes them: a strict stdout raised).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str, limit: int | None = None, tail: bool = False) -> str:
    """Others' text (a box's, a registry's, a store's) as boxvm shows it in messages and on
    a terminal: control characters replaced, and cut to ``limit`` characters if given (its
    beginning kept, or with ``tail`` its end)."""
    if limit is not None and len(text) > limit:
        text = "…" + text[-limit:] if tail else text[:limit] + "…"
    return _CONTROL.sub("?", text)


class BoxvmError(Exception):
    code = "BoxvmError"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @classmethod
    def kind(cls) -> str:
        """The exact class, e.g. ``SnapshotNotFound`` where ``code`` says ``NotFound``."""
        return cls.__name__

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "code": self.kind(), "message": self.message, "status": self.http_status}


class InvalidArgument(BoxvmError):
    code = "InvalidArgument"
    http_status = 400


class NotFound(BoxvmError):
    code = "NotFound"
    http_status = 404


class BoxNotFound(NotFound):
    pass


class SnapshotNotFound(NotFound):
    pass


class AlreadyExists(BoxvmError):
    code = "AlreadyExists"
    http_status = 409


class InvalidState(BoxvmError):
    code = "InvalidState"
    http_status = 409


class QuiesceError(BoxvmError):
    code = "QuiesceError"
    http_status = 409


class ImageError(BoxvmError):
    code = "ImageError"
    http_status = 422


class ArchiveError(BoxvmError):
    code = "ArchiveError"
    http_status = 422


class EngineError(BoxvmError):
    code = "EngineError"
    http_status = 503


class StorageError(BoxvmError):
    code = "StorageError"
    http_status = 507


class Unauthorized(BoxvmError):
    code = "Unauthorized"
    http_status = 401


class Unsupported(BoxvmError):
    code = "Unsupported"
    http_status = 501


def _classes(cls: type[BoxvmError]) -> list[type[BoxvmError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _classes(direct))]


# The classes a peer may name: this module's (subclasses elsewhere, with constructors of their
# own, travel as their nearest class here by ``type``).
KINDS = {cls.kind(): cls for cls in _classes(BoxvmError)}


def from_dict(data: object) -> BoxvmError:
    """Rebuild the exception a peer serialised with :meth:`BoxvmError.to_dict`: the class its
    ``code`` names, else (a peer without codes) the top-level class its ``type`` names."""
    if not isinstance(data, dict):
        return BoxvmError(f"a peer sent a malformed error: {str(data)[:200]!r}")
    cls = KINDS.get(str(data.get("code"))) or KINDS.get(str(data.get("type"))) or BoxvmError
    return cls(str(data.get("message", "")))
