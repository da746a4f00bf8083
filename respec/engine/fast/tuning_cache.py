"""The Triton kernels' tuned configurations, kept on disk between runs.

Tuning times every candidate configuration of every new kernel shape on the GPU (back to
back in CUDA graphs: kernels._tuned). A run of the actor graph at the 0.5B shape meets a
few dozen shapes (four products and attention, per block of rows and draft length), and
its first RL step came 20-55 s after the start on an H100, most of it capturing and tuning
(docs/PERFORMANCE.md, "The fast path on an H100 after 198c9fe", 6). The choice depends
only on the GPU, the kernels' code and the shape, so a later run on the same machine reads
it back instead.

One JSON file per (GPU name, Triton version, kernels.py's source): a new GPU, Triton or
kernel code starts a new file, so a configuration is never reused where it may not build
or may no longer be the fastest. RESPEC_TUNE_CACHE names the file's folder
(default ~/.cache/respec); RESPEC_TUNE_CACHE=off turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
import triton

from respec.files import write_atomically


class TuningCache:
    """Configurations by kernel key (a tuple of names, sizes and flags), in one JSON file.
    Several processes may share the file (a trainer and a generator on one GPU): each
    write merges what is on disk with its own choices and replaces the file atomically, so
    a reader sees a whole file and at most a concurrent choice is lost (and tuned again)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries = self._read() if path is not None else {}

    def get(self, key: tuple) -> tuple | None:
        config = self.entries.get(repr(key))
        return tuple(config) if config is not None else None

    def put(self, key: tuple, config: tuple) -> None:
        self.entries[repr(key)] = list(config)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps({**self._read(), **self.entries}, indent=1, sort_keys=True))
        except OSError as error:  # a read-only home, a full disk: tune every run, as without it
            warnings.warn(f"kernel tuning cache {self.path} not writable ({error}): tuning again in every run",
                          stacklevel=2)
            self.path = None

    def _read(self) -> dict[str, list]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or cut short by a crash: start again
            return {}
        return entries if isinstance(entries, dict) else {}


def cache_path(device: torch.device, source: Path) -> Path | None:
    """This GPU's file for kernels of this source, None where RESPEC_TUNE_CACHE=off."""
    folder = os.environ.get("RESPEC_TUNE_CACHE", "")
    if folder.lower() == "off":
        return None
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-").lower()
    code = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    root = Path(folder).expanduser() if folder else Path.home() / ".cache" / "respec"
    return root / f"kernels-{gpu}-triton{triton.__version__}-{code}.json"
