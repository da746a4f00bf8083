"""Checking free-form numeric answers (the GSM8K / MATH shape).

The answer is the content of the last `\\boxed{...}` if there is one, else the last number
in the response. Numbers compare exactly as fractions: `1,000`, `1000.0`, `2/4` and `0.5`
mean what they say.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\boxed\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(response: str) -> str | None:
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} works)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return None


def as_number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    frac = re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", text)
    if frac:
        text = f"{frac.group(1)}/{frac.group(2)}"
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(response_answer: str | None, reference: str) -> bool:
    if response_answer is None:
        return False
    got, want = as_number(response_answer), as_number(reference)
    if got is not None and want is not None:
        return got == want
    return response_answer.strip() == reference.strip()
