"""Rich tables that also print as plain text, and a console that never wraps piped output."""

from __future__ import annotations

import sys
from typing import IO

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table

__all__ = ["PrintableTable", "output_console", "plain_text"]

_UNBOUNDED = 1_000_000
"""Width for output that is not a terminal: wide enough that nothing is wrapped or cut."""


def output_console(file: IO[str] | None = None, *, stderr: bool = False) -> Console:
    """A console for the command line's output.

    On a terminal it fits the terminal. Piped to a file or another program, nothing is
    wrapped or cut at a terminal width (whatever ``COLUMNS`` says): a table is as wide as
    its widest row, a line as long as its text, and no colour codes are written.
    """
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if stream.isatty():
        return Console(file=file, stderr=stderr)
    return Console(file=file, stderr=stderr, width=_UNBOUNDED, soft_wrap=True, no_color=True)


def plain_text(renderable: RenderableType) -> str:
    """``renderable`` as plain text at its natural width (no colours, no wrapping)."""
    console = Console(width=_UNBOUNDED, no_color=True, color_system=None, soft_wrap=True)
    width = Measurement.get(console, console.options, renderable).maximum
    console = Console(width=max(width, 1), no_color=True, color_system=None, soft_wrap=True)
    with console.capture() as captured:
        console.print(renderable)
    return captured.get().rstrip("\n")


class PrintableTable(Table):
    """A :class:`rich.table.Table` that ``print()`` and ``str()`` show as the table itself."""

    def __str__(self) -> str:
        return plain_text(self)
