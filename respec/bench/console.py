"""The console benches print their tables to: a terminal's own width, or, when the output
goes to a file or a pipe (a GPU call's log, CI), one wide enough that no column is cut.
Rich assumes 80 columns there, and the e2e table's 14 columns came out as "va…", "se…"."""

from __future__ import annotations

import sys

from rich.console import Console

FILE_WIDTH = 250


def table_console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=FILE_WIDTH)
