"""The one error hierarchy of boxvm.

    BoxvmError
     ├── InvalidArgument   400  bad name, option or argument
     ├── NotFound          404  no such box, image or path
     ├── AlreadyExists     409  name taken
     ├── InvalidState      409  operation not allowed in the box's current status
     ├── QuiesceError      409  guest filesystem could not be frozen
     ├── ImageError        422  image missing, unreadable or unsafe
     ├── ArchiveError      422  corrupt, unsupported or unsafe archive
     ├── EngineError       503  QEMU or the guest agent failed
     ├── StorageError      507  the host disk failed or is full
     ├── Unauthorized      401  REST token missing or wrong
     └── Unsupported       501  the server lacks an API version or capability

Every class has a stable ``code`` and ``http_status`` so a REST server can send
``{type, message, status}`` and a client can raise the very same class again.
Foreign exceptions are translated at the boundary with ``raise X(...) from exc``.
"""

from __future__ import annotations


class BoxvmError(Exception):
    code = "BoxvmError"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "message": self.message, "status": self.http_status}


class InvalidArgument(BoxvmError):
    code = "InvalidArgument"
    http_status = 400


class NotFound(BoxvmError):
    code = "NotFound"
    http_status = 404


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


_BY_CODE = {cls.code: cls for cls in (BoxvmError, *BoxvmError.__subclasses__())}


def from_dict(data: dict[str, object]) -> BoxvmError:
    """Rebuild the exception a peer serialised with :meth:`BoxvmError.to_dict`."""
    cls = _BY_CODE.get(str(data.get("type")), BoxvmError)
    return cls(str(data.get("message", "")))
