"""The fast path's step cost per (batch bucket, draft length) on this GPU, kept on disk.

FastRollouts' adaptive choice weighs each draft length's expected accepted tokens against
what a step of it costs on this device, so it times every (bucket, length) before its
first batch: at the 0.5B shape with 7 buckets and 4 lengths (28 graphs captured and
timed) that took 29.4 s on a fresh H100, and on two H100s respec reached its first RL step
13.7 s after the synchronous no-SD baseline (docs/PERFORMANCE.md, "The actor graph on two
GPUs, and step costs kept on disk").

A GPU's step costs repeat from run to run (a shared CPU's do not, so the CPU measures
every time). So on CUDA the costs go to one JSON file per key: the GPU, torch and Triton
versions, the fast path's own code, the model's and head's configs (cost depends on
shapes, not weights, so a policy that moves during RL keeps its costs), the row and
length limits, the sampling, the draft lengths and the kernel switches. A later run with
the same key reads them back, and captures only the graphs it then uses. The folder is
the kernel tuner's (RESPEC_TUNE_CACHE; "off" turns both off).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from respec.files import cache_folder, file_name_part, write_atomically

FAST_PATH_CODE = Path(__file__).parent  # its .py files: a change to any of them measures again
SWITCHES = ("RESPEC_KERNELS", "RESPEC_PDL", "RESPEC_PDL_PREFETCH", "RESPEC_ATTEND_O")


def step_cost_key(device: torch.device, model_dir: str | Path, head_dir: str | Path, **settings) -> dict:
    """What a step's cost depends on, besides the weights' values. `settings`: the limits,
    sampling and draft lengths the caller runs with (JSON values)."""
    import triton

    return {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "code": _digest(sorted(FAST_PATH_CODE.glob("*.py"))),
            "model": _digest([Path(model_dir) / "config.json"]), "head": _digest(sorted(Path(head_dir).glob("*.json"))),
            "switches": {name: os.environ.get(name, "") for name in SWITCHES}, **settings}


class StepCostCache:
    """Step costs by key, one file per key in `folder` (None: nothing is kept)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    @classmethod
    def for_device(cls, device: torch.device) -> StepCostCache:
        """The tuner's folder on CUDA; nothing on the CPU or with RESPEC_TUNE_CACHE=off."""
        return cls(cache_folder() if device.type == "cuda" else None)

    def load(self, key: dict) -> dict[tuple[int, int], float] | None:
        if self.folder is None:
            return None
        try:
            stored = json.loads(self._path(key).read_text())
            if stored["key"] != key:  # a hash collision, or a file from elsewhere
                return None
            return {_pair(text): float(seconds) for text, seconds in stored["costs"].items()}
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or cut short: measure
            return None

    def store(self, key: dict, costs: dict[tuple[int, int], float]) -> None:
        if self.folder is None:
            return
        payload = {"key": key, "costs": {f"{b}/{k}": seconds for (b, k), seconds in sorted(costs.items())}}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self._path(key), json.dumps(payload, indent=1, sort_keys=True))
        except OSError as error:  # a read-only home, a full disk: measure in every run, as without it
            warnings.warn(f"step cost cache {self.folder} not writable ({error}): measuring in every run",
                          stacklevel=2)
            self.folder = None

    def _path(self, key: dict) -> Path:
        gpu = file_name_part(str(key.get("gpu", "")))
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"step-costs-{gpu}-{digest}.json"


def _pair(text: str) -> tuple[int, int]:
    bucket, length = text.split("/")
    return int(bucket), int(length)


def _digest(paths: list[Path]) -> str:
    """A short hash of the files' bytes (a missing file counts as empty)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:16]
