"""Countdown-style puzzles: reach the target from the given numbers with + - * /.

Prompt `3,7,25>46:`; an answer is an expression using each given number at most once,
e.g. `25+3*7`. The checker evaluates it with the safe parser in expression.py, never
with `eval`. Puzzles are built from a random expression
over a subset of the numbers, so every puzzle has a solution (the supervised target).
"""

from __future__ import annotations

import random
from collections import Counter

from respec.tasks.base import CheckResult, Problem, Task
from respec.tasks.expression import ExpressionError, evaluate, numbers_used


class Countdown(Task):
    name = "countdown"

    def __init__(self, count: int = 3, max_number: int = 20, use_at_least: int = 2,
                 partial_reward: float = 0.1) -> None:
        if not 2 <= use_at_least <= count:
            raise ValueError("need 2 <= use_at_least <= count")
        self.count, self.max_number, self.use_at_least = count, max_number, use_at_least
        self.partial_reward = partial_reward  # a valid expression that misses the target

    def sample(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            used = rng.sample(numbers, rng.randint(self.use_at_least, self.count))
            expression = str(used[0])
            for number in used[1:]:
                expression += rng.choice("+-*") + str(number)
            target = evaluate(expression)
            if target.denominator == 1 and target > 0:
                prompt = ",".join(map(str, numbers)) + f">{target.numerator}:"
                return Problem(prompt=prompt, answer=str(target.numerator), solution=expression,
                               meta={"numbers": numbers})

    def check(self, response: str, problem: Problem) -> CheckResult:
        expression = response.strip().split("\n")[0]
        try:
            value = evaluate(expression)
            used = numbers_used(expression)
        except ExpressionError as error:
            return CheckResult(0.0, False, f"not an expression: {error}")
        available = Counter(problem.meta.get("numbers") or _numbers_of(problem.prompt))
        if Counter(used) - available:
            return CheckResult(0.0, False, "uses a number not given (or more often than given)")
        if value == int(problem.answer):
            return CheckResult(1.0, True)
        return CheckResult(self.partial_reward, False)


def _numbers_of(prompt: str) -> list[int]:
    return [int(part) for part in prompt.split(">")[0].split(",")]
