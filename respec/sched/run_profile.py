"""`respec profile CONFIG --out FILE`: profile the run's target and drafter on this machine."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from respec.engine.checkpoint import load_model
from respec.sched.profile import Profile, grid_size, profile, profile_key
from respec.sched.setup import build_drafter, setup_from_run_config, task_prompts


def profile_run_config(config: str | Path, out: str | Path, configs, batches, contexts, repeats: int = 8,
                       threads: int = 1, device: str = "cpu") -> Profile:
    if threads:
        torch.set_num_threads(threads)
    setup = setup_from_run_config(config)
    model = load_model(Path(setup.model_path), device=device)
    drafter = build_drafter(setup, model)
    key = profile_key(setup.model_path, setup.drafter, setup.draft_path, device)
    has_tokenizer = (Path(setup.model_path) / "tokenizer.json").is_file()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("profile", total=grid_size(configs, batches, contexts, drafter is not None))
        measured = profile(model, drafter, key, configs, batches, contexts,
                           accept_prompts=task_prompts(setup.model_path, 16) if has_tokenizer else None,
                           repeats=repeats, advance=lambda label, points: progress.update(task, advance=points, description=label))
    measured.save(out)
    return measured
