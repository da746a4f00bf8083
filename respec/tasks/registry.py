"""Tasks by name, as the run file names them."""

from __future__ import annotations

from typing import Any

from respec.tasks.arithmetic import Arithmetic
from respec.tasks.base import Task
from respec.tasks.countdown import Countdown
from respec.tasks.dataset import Dataset
from respec.tasks.format_shift import FormatShift
from respec.tasks.mixture import Mixture
from respec.tasks.user_reward import UserReward

BUILT_IN = {"arithmetic": Arithmetic, "countdown": Countdown, "dataset": Dataset, "format_shift": FormatShift}


def make_task(name: str, reward_fn: str = "", **params: Any) -> Task:
    """`make_task("arithmetic", max_operands=3)`; "a+b" mixes tasks; reward_fn overrides checking."""
    if "+" in name:
        task: Task = Mixture([make_task(part) for part in name.split("+")])
    elif name in BUILT_IN:
        try:
            task = BUILT_IN[name](**params)
        except TypeError as error:
            raise ValueError(f"task {name!r}: {error}") from None
    else:
        raise ValueError(f"unknown task {name!r}; built in: {', '.join(BUILT_IN)} (or 'a+b' to mix)")
    return UserReward(task, reward_fn) if reward_fn else task
