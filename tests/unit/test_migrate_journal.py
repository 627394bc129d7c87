"""A migration's journal across boxvm versions (``boxvm.migrate``): one without a field this
version added loads; this version writes no empty field an older one would refuse; one with
a field this version does not know is refused as a newer boxvm's, not taken for garbage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boxvm.errors import InvalidState
from boxvm.migrate import Journal, _load, _save


def test_journals_of_older_and_newer_versions(tmp_path: Path) -> None:
    path = tmp_path / "box.json"
    journal = Journal("a" * 32, "box", "http://target", "s3://bucket/moves/box-1.boxsnap", nonce="n" * 32)
    _save(path, journal)
    assert "stale" not in json.loads(path.read_text())  # an older boxvm can finish it
    assert _load(path) == journal
    journal.stale.append("s3://bucket/moves/box-0.boxsnap")
    _save(path, journal)
    assert _load(path) == journal
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "lease": "x"}))
    with pytest.raises(InvalidState, match="newer boxvm"):
        _load(path)
    path.write_text("{not json")
    with pytest.raises(InvalidState, match="unreadable"):
        _load(path)
