"""Where things live under the runtime home (``$BOXVM_HOME``, default ``~/.boxvm``).

Everything is on one filesystem so that renames from ``tmp/`` are atomic.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def default(cls, root: str | os.PathLike[str] | None = None) -> Home:
        chosen = root or os.environ.get("BOXVM_HOME") or Path.home() / ".boxvm"
        return cls(Path(chosen).expanduser().absolute())

    @property
    def db(self) -> Path:
        return self.root / "db" / "boxvm.db"

    @property
    def guest(self) -> Path:
        return self.root / "guest"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def boxes(self) -> Path:
        return self.root / "boxes"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def box_dir(self, box_id: str) -> Path:
        return self.boxes / box_id

    def ensure(self) -> None:
        for path in (self.db.parent, self.guest, self.images, self.boxes, self.cache, self.tmp):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)

    def staging_dir(self, prefix: str) -> Path:
        """A new directory under ``tmp/``; the pid in its name lets start-up recovery
        tell live work from a crashed process's leftovers."""
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=self.tmp))

    @contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A staging directory that is removed unless renamed away."""
        import shutil

        path = self.staging_dir(prefix)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
