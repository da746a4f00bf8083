"""What `respec profile` and `respec bench adaptive` build: the target and its drafter,
from directories or from a run's YAML (the Verifier's model, the Generator's drafter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from respec.engine.drafters.base import Drafter

DRAFTERS = ("none", "ngram", "eagle")


@dataclass(frozen=True)
class ModelSetup:
    model_path: str
    drafter: str  # "none", "ngram" or "eagle"
    draft_path: str = ""  # eagle: a head saved by EagleHead.save ("" = freshly initialised)
    feature_window: int = 16


def setup_from_run_config(path: str | Path) -> ModelSetup:
    """The Verifier's model_path and the Generator's drafter/draft_path of a run file."""
    from respec.runtime.graph import load_config

    config = load_config(path)
    verifiers = [a for a in config.actors.values() if a.cls.endswith(".Verifier")]
    generators = [a for a in config.actors.values() if a.cls.endswith(".Generator")]
    if not verifiers or "model_path" not in verifiers[0].params:
        raise ValueError(f"{path}: no Verifier actor with params.model_path to profile")
    generator = generators[0].params if generators else {}
    return ModelSetup(str(verifiers[0].params["model_path"]), str(generator.get("drafter", "ngram")),
                      str(generator.get("draft_path", "")), int(generator.get("feature_window", 16)))


def build_drafter(setup: ModelSetup, model) -> Drafter | None:
    if setup.drafter not in DRAFTERS:
        raise ValueError(f"unknown drafter {setup.drafter!r}; one of {', '.join(DRAFTERS)}")
    if setup.drafter == "none":
        return None
    if setup.drafter == "ngram":
        from respec.engine.drafters.ngram import NgramDrafter

        return NgramDrafter()
    from respec.engine.drafters.eagle import EagleDrafter, EagleHead

    if setup.draft_path:
        if not (Path(setup.draft_path) / "eagle_head.json").is_file():
            raise ValueError(f"draft_path {setup.draft_path!r}: no EAGLE head there (eagle_head.json)")
        head = EagleHead.load(setup.draft_path, model)
    else:
        torch.manual_seed(0)
        head = EagleHead.for_target(model)
    return EagleDrafter(model, head.eval(), setup.feature_window)


def task_prompts(model_dir: str | Path, count: int, seed: int = 0) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """(prompts, stop ids): the built-in task as RL poses it, as `respec bench sd` does."""
    from respec.bench.sd import bench_prompts

    return bench_prompts(Path(model_dir), count, seed)
