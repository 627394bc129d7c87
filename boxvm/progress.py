"""Progress reporting for long first-run work (guest build, image conversion)."""

from collections.abc import Callable

Progress = Callable[[str], None]


def silent(_message: str) -> None:
    """The default: say nothing (the CLI passes a printer or a progress bar)."""
