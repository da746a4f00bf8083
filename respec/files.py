"""Writing a file so that a reader never sees half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path`, then rename it over `path`: a reader (or a
    crash) sees the old file or the new one, never part of one. The temporary name is
    unique, so two processes writing the same path at once do not write into each other's
    (the last rename wins)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as out:
        out.write(text)
    os.replace(out.name, path)
