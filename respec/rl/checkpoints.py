"""RL checkpoints: everything `respec run --resume` needs to continue as if never stopped.

Layout, under `runs/<name>/checkpoints/`:

    step-000012/policy.safetensors   the policy weights (Hugging Face names)
    step-000012/trainer.pt           optimizer state, torch RNG state
    step-000012/meta.json            step, versions, data position (see `CheckpointMeta`)
    latest                           the name of the newest complete checkpoint

A checkpoint is written to a temporary directory and renamed into place, and `latest`
is replaced atomically after it: a process killed mid-write leaves the previous
checkpoint as the latest, never a half-written one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from respec.files import write_atomically

CHECKPOINTS = "checkpoints"
LATEST = "latest"
POLICY_FILE = "policy.safetensors"


@dataclass
class CheckpointMeta:
    step: int  # RL updates done
    policy_version: int
    draft_version: int = 0
    # The data position: every group trained on so far. Prompts are a pure function of
    # (seed, group index), so this alone says what to pose next and what to pose again.
    trained_groups: list[int] = field(default_factory=list)
    eval_start: dict[str, float] = field(default_factory=dict)  # held-out accuracy at step 0

    @property
    def next_group(self) -> int:
        return max(self.trained_groups, default=-1) + 1


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(run_dir: str | Path, meta: CheckpointMeta, policy: dict[str, torch.Tensor],
                    trainer_state: dict, keep: int = 2) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{meta.step:06d}"
    partial = root / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.items()}, partial / POLICY_FILE)
    torch.save(trainer_state, partial / "trainer.pt")
    (partial / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    write_atomically(root / LATEST, name)
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_meta(checkpoint: Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((checkpoint / "meta.json").read_text()))


def load_policy(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / POLICY_FILE)


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer.pt", weights_only=False)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all)."""
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
