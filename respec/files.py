"""Writing a file so that a reader never sees half of it; where measurements this machine
keeps between runs live."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def cache_folder() -> Path | None:
    """The folder for what a GPU's runs measure once and keep (the kernel tuner's choices,
    FastRollouts' step costs): RESPEC_TUNE_CACHE, else ~/.cache/respec; None where
    RESPEC_TUNE_CACHE=off."""
    setting = os.environ.get("RESPEC_TUNE_CACHE", "")
    if setting.lower() == "off":
        return None
    return Path(setting).expanduser() if setting else Path.home() / ".cache" / "respec"


def file_name_part(text: str) -> str:
    """`text` (a GPU's name) as a lower-case piece of a file name: "NVIDIA H100 80GB HBM3"
    -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path`, then rename it over `path`: a reader (or a
    crash) sees the old file or the new one, never part of one. The temporary name is
    unique, so two processes writing the same path at once do not write into each other's
    (the last rename wins)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as out:
        out.write(text)
    os.replace(out.name, path)
