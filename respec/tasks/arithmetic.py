"""Multi-step arithmetic with a worked answer.

Prompt `12+7*3=`; a worked solution evaluates one operation per step, by precedence, and
ends with the answer after `A:` — `7*3=21;12+21=33;A:33`. Only the final answer is
checked, so the policy may find its own way there.
"""

from __future__ import annotations

import random
import re

from respec.tasks.base import CheckResult, Problem, Task

_ANSWER = re.compile(r"A:(-?\d+)")


class Arithmetic(Task):
    name = "arithmetic"

    def __init__(self, min_operands: int = 2, max_operands: int = 3, max_value: int = 20,
                 operators: str = "+-*") -> None:
        if not 2 <= min_operands <= max_operands:
            raise ValueError("need 2 <= min_operands <= max_operands")
        if not set(operators) <= set("+-*"):
            raise ValueError(f"operators must be among '+-*', got {operators!r}")
        self.min_operands, self.max_operands = min_operands, max_operands
        self.max_value, self.operators = max_value, operators

    def sample(self, rng: random.Random) -> Problem:
        count = rng.randint(self.min_operands, self.max_operands)
        numbers = [rng.randint(1, self.max_value) for _ in range(count)]
        operators = [rng.choice(self.operators) for _ in range(count - 1)]
        text = _expression(numbers, operators)
        steps, answer = worked_steps(numbers, operators)
        return Problem(prompt=f"{text}=", answer=str(answer), solution=";".join([*steps, f"A:{answer}"]))

    def check(self, response: str, problem: Problem) -> CheckResult:
        found = _ANSWER.findall(response)
        if not found:
            return CheckResult(0.0, False)
        correct = found[-1] == problem.answer
        return CheckResult(1.0 if correct else 0.0, correct)


def worked_steps(numbers: list[int], operators: list[str]) -> tuple[list[str], int]:
    """Evaluate by precedence, one operation per step: products first, then left to right."""
    steps = [f"{left}{op}{right}={value}" for left, op, right, value, _ in _reductions(numbers, operators)]
    return steps, _value(numbers, operators)


def reduction_stages(numbers: list[int], operators: list[str]) -> list[str]:
    """The expression before and after each step of `worked_steps`: `12+7*3`, `12+21`, `33`."""
    stages = [_expression(numbers, operators)]
    return stages + [stage for *_, stage in _reductions(numbers, operators)]


def _reductions(numbers: list[int], operators: list[str]):
    """(left, op, right, value, the remaining expression) for each step, by precedence."""
    numbers, operators = list(numbers), list(operators)
    for pass_operators in ("*", "+-"):
        index = 0
        while index < len(operators):
            if operators[index] in pass_operators:
                left, right, op = numbers[index], numbers[index + 1], operators[index]
                value = left * right if op == "*" else left + right if op == "+" else left - right
                numbers[index : index + 2] = [value]
                del operators[index]
                yield left, op, right, value, _expression(numbers, operators)
            else:
                index += 1


def _value(numbers: list[int], operators: list[str]) -> int:
    reductions = list(_reductions(numbers, operators))
    return reductions[-1][3] if reductions else numbers[0]


def _expression(numbers: list[int], operators: list[str]) -> str:
    return "".join(f"{n}{o}" for n, o in zip(numbers, operators, strict=False)) + str(numbers[-1])
