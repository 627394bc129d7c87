"""Print the REST API's OpenAPI document (committed as ``docs/openapi.json``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from boxvm.backends.local import LocalBackend
from boxvm.paths import Home
from boxvm.server.run import local_app


def document() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:  # the schema does not depend on any home
        return local_app(LocalBackend(Home.default(Path(tmp))), None).openapi()


if __name__ == "__main__":
    print(json.dumps(document(), indent=2, sort_keys=True))
