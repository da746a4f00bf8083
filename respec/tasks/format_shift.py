"""Arithmetic with two answer formats: the task that makes a frozen drafter go stale.

RL on real models moves the policy's output to content its drafter was not distilled on.
Here that move is built in. The worked solutions the policy is supervised on come in two
formats, neither named by the prompt:

- common (the arithmetic task's): one operation per step, `7*3=21;12+21=33;A:33`;
- rare (`rare_share` of the solutions): the whole remaining expression restated after
  every operation, `(12+7*3)=(12+21)=33 A:33`. It differs from the common format from
  the first token on, in most of its tokens (brackets, the copied operands, the answer
  marker), not in one separator.

The drafter is distilled on the policy's own completions, so it sees the rare format
rarely and drafts it poorly. With `reward_format: rare` only a right answer in the rare
format earns reward: RL moves the policy from the common format to the rare one (it
already samples it now and then, so GRPO can find it), and a frozen drafter is left
drafting a format it hardly knows.
"""

from __future__ import annotations

import random
import re

from respec.tasks.arithmetic import Arithmetic, reduction_stages, worked_steps
from respec.tasks.base import CheckResult, Problem

COMMON, RARE, OTHER = "common", "rare", "other"
_NUMBER = r"-?\d+"
_ANSWER = re.compile(rf"A:({_NUMBER})")
REWARD_FORMATS = ("any", COMMON, RARE)


class FormatShift(Arithmetic):
    name = "format_shift"
    forms = (COMMON, RARE, OTHER)

    def __init__(self, rare_share: float = 0.1, reward_format: str = "any", **arithmetic) -> None:
        if not 0.0 <= rare_share <= 1.0:
            raise ValueError(f"rare_share must be within [0, 1], got {rare_share!r}")
        if reward_format not in REWARD_FORMATS:
            raise ValueError(f"reward_format must be one of {', '.join(REWARD_FORMATS)}, got {reward_format!r}")
        super().__init__(**arithmetic)
        self.rare_share, self.reward_format = rare_share, reward_format

    def sample(self, rng: random.Random) -> Problem:
        problem = super().sample(rng)
        # the format is drawn after the problem, from the same rng: reproducible, one draw each
        if rng.random() < self.rare_share:
            numbers, operators = parse_operands(problem.prompt)
            return Problem(problem.prompt, problem.answer, rare_solution(numbers, operators), {"format": RARE})
        return Problem(problem.prompt, problem.answer, problem.solution, {"format": COMMON})

    def check(self, response: str, problem: Problem) -> CheckResult:
        found = _ANSWER.findall(response)
        right = bool(found) and found[-1] == problem.answer
        rewarded = right and self.reward_format in ("any", format_of(response))
        return CheckResult(1.0 if rewarded else 0.0, rewarded)

    def form_of(self, response: str) -> str:
        return format_of(response)


def format_of(response: str) -> str:
    """"common", "rare" or "other", by the layout's marks alone: the rare layout opens with a
    bracket and answers after a space (` A:`), the common one separates steps and answer by
    `;` and never opens with a bracket. What lies between is not checked: a policy sampled at
    T = 1 slips a character now and then (`6-6/6=2`), and a slip is not a change of layout."""
    text = response.strip()
    if text.startswith("(") and " A:" in text and ";" not in text:
        return RARE
    if not text.startswith("(") and " A:" not in text and (text.startswith("A:") or ";A:" in text):
        return COMMON
    return OTHER


def rare_solution(numbers: list[int], operators: list[str]) -> str:
    """`(12+7*3)=(12+21)=33 A:33`: every stage of the expression but the last in brackets."""
    stages = reduction_stages(numbers, operators)
    answer = worked_steps(numbers, operators)[1]
    return "=".join(f"({stage})" for stage in stages[:-1]) + f"={answer} A:{answer}"


def parse_operands(prompt: str) -> tuple[list[int], list[str]]:
    """`12+7*3=` -> ([12, 7, 3], ["+", "*"]) (prompts hold positive numbers only)."""
    parts = re.findall(r"\d+|[+\-*]", prompt.rstrip("="))
    return [int(p) for p in parts[0::2]], parts[1::2]
