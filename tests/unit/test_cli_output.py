"""What the CLI prints of text others wrote (a box's console or stderr, a registry's or a
server's error): as it is, never as Rich markup, with terminal control characters replaced."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from boxvm.cli import main
from boxvm.errors import printable


def test_an_error_naming_markup_is_printed_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name (or a box's message) with "[/x]" made Rich raise inside the error handler,
    and "[link=…]" made a hyperlink."""
    monkeypatch.setenv("BOXVM_HOME", str(tmp_path))
    result = CliRunner().invoke(main.cli, ["rm", "[/x][link=http://evil]y"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit | None), result.output
    assert "[/x][link=http://evil]y" in result.stderr and "error" in result.stderr


def test_control_characters_are_replaced() -> None:
    assert printable("a\x1b]0;title\x07b\tc\nd\x9be") == "a?]0;title?b\tc\nd?e"
    assert printable("x" * 10, 4) == "xxxx…"
