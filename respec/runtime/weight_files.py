"""Weight snapshots an actor writes as files for other processes to load (the `file`
weights handle): in a directory of the user's or a temporary one the actor owns; only
the latest few are kept (receivers load a version as it arrives, and a run publishes one
per step: 150 versions of even the tiny policy were 1.8 GB left in /tmp per run), and an
owned directory goes when the actor stops."""

from __future__ import annotations

import shutil
import tempfile
from collections import deque
from pathlib import Path

import torch
from safetensors.torch import save_file


class WeightFiles:
    def __init__(self, directory: str, prefix: str, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the latest version is being read), got {keep}")
        self.owned = not directory
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix=prefix))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._written: deque[Path] = deque()

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Write `tensors` as NAME.safetensors; the oldest file beyond `keep` is deleted."""
        path = self.path(name)
        save_file(tensors, str(path))
        self._written.append(path)
        while len(self._written) > self.keep:
            self._written.popleft().unlink(missing_ok=True)
        return path

    def close(self) -> None:
        """Remove the directory if this object made it (a user's directory stays, with the
        latest files)."""
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)
