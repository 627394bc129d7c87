"""What every state service shares."""

from __future__ import annotations

from dataclasses import dataclass, field

from boxvm.disks.layers import LayerStore
from boxvm.engine.client import Connection
from boxvm.images import ImageStore
from boxvm.paths import Home
from boxvm.progress import Progress
from boxvm.store import Store


class Connections:
    """This process's open connections to running boxes' supervisors (one per box)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._open: dict[str, Connection] = {}

    async def get(self, box_id: str, label: str) -> Connection:
        conn = self._open.get(box_id)
        if conn is None or conn.closed:
            conn = await Connection.open(self.home.box_dir(box_id) / "ctl.sock", label)
            self._open[box_id] = conn
        return conn

    async def drop(self, box_id: str) -> None:
        conn = self._open.pop(box_id, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        for box_id in list(self._open):
            await self.drop(box_id)


@dataclass
class Context:
    """One home: its store, its images, its layer files and the connections to its running boxes."""

    home: Home
    store: Store
    images: ImageStore
    layers: LayerStore
    progress: Progress
    conns: Connections = field(init=False)

    def __post_init__(self) -> None:
        self.conns = Connections(self.home)
