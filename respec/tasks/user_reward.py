"""A user's reward function, named by import path in the run file.

`reward_fn: my_package.rewards:score` (or `my_package.rewards.score`) is called as
`score(response, answer, prompt)` and returns a float reward, or `(reward, correct)`.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable

from respec.tasks.base import CheckResult, Problem, Task


def load_function(path: str) -> Callable:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {path!r}: cannot import {module_name!r}: {error}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"reward function {path!r}: {module_name!r} has no function {attr!r}")
    return function


class UserReward(Task):
    """Wraps another task's problems with the user's reward function as the checker."""

    def __init__(self, problems: Task, reward_fn: str) -> None:
        self.problems = problems
        self.function = load_function(reward_fn)
        self.name = f"{problems.name}+{reward_fn}"
        self.forms = problems.forms

    def sample(self, rng: random.Random) -> Problem:
        return self.problems.sample(rng)

    def heldout(self, count: int, seed: int = 12345) -> list[Problem]:
        return self.problems.heldout(count, seed)

    def form_of(self, response: str) -> str:
        return self.problems.form_of(response)

    def check(self, response: str, problem: Problem) -> CheckResult:
        result = self.function(response, problem.answer, problem.prompt)
        if isinstance(result, tuple):
            reward, correct = result
            return CheckResult(float(reward), bool(correct))
        return CheckResult(float(result), float(result) > 0)
