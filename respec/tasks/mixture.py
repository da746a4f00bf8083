"""Several tasks as one: each problem comes from one of them, chosen at random."""

from __future__ import annotations

import random

from respec.tasks.base import CheckResult, Problem, Task


class Mixture(Task):
    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = {task.name: task for task in tasks}
        self.name = "+".join(self.tasks)

    def sample(self, rng: random.Random) -> Problem:
        name = rng.choice(list(self.tasks))
        problem = self.tasks[name].sample(rng)
        return Problem(problem.prompt, problem.answer, problem.solution, {**problem.meta, "task": name})

    def check(self, response: str, problem: Problem) -> CheckResult:
        return self.tasks[problem.meta["task"]].check(response, problem)
