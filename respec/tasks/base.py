"""What every task provides: problems to pose and a checker for the policy's answers."""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    prompt: str  # what the policy sees
    answer: str  # the reference the checker compares against (never shown to the policy)
    solution: str = ""  # a worked solution in the task's answer format (for supervised warm-up)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    reward: float
    correct: bool
    error: str = ""  # why the reward is 0 when the checker could not judge


class Task(abc.ABC):
    name: str = "task"
    forms: tuple[str, ...] = ()  # the layouts form_of tells apart (none: it does not)

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """A fresh problem; the same rng state gives the same problem."""

    @abc.abstractmethod
    def check(self, response: str, problem: Problem) -> CheckResult:
        """Judge a response; must not raise on any string."""

    def form_of(self, response: str) -> str:
        """The layout a response is in, for tasks that tell layouts apart (runs report the
        share of each per RL step); "" where the task does not."""
        return ""

    def heldout(self, count: int, seed: int = 12345) -> list[Problem]:
        """A fixed evaluation set, the same for every run with this seed."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(count)]
