"""What the REST client and server agree on: connection timing, and the result dataclasses
rebuilt from the server's JSON (FastAPI encodes them there).

Fields the client does not know are ignored, so a newer server can add some.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from boxvm.options import BoxInfo, DiskUsage, SnapshotInfo
from boxvm.status import BoxStatus

# Idle HTTP connections: the client drops them well before the server does. With both at
# 5 s (the httpx and uvicorn defaults) a request sent on a connection the server was just
# closing failed with a ReadError, and a start or stop cannot be retried blindly.
SERVER_KEEPALIVE_SECS = 30
CLIENT_KEEPALIVE_SECS = 10


def _known(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    return {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}


def box_info(data: dict[str, Any]) -> BoxInfo:
    values = _known(BoxInfo, data)
    values["status"] = BoxStatus(values["status"])
    values["ports"] = [tuple(p) for p in values.get("ports") or []]
    return BoxInfo(**values)


def snapshot_info(data: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(**_known(SnapshotInfo, data))


def disk_usage(data: dict[str, Any]) -> DiskUsage:
    return DiskUsage(
        boxes={k: (v[0], v[1]) for k, v in data["boxes"].items()},
        snapshots={k: (v[0], v[1]) for k, v in data["snapshots"].items()},
        layers_bytes=data["layers_bytes"],
    )
