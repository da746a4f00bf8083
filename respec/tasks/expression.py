"""A safe evaluator for integer arithmetic expressions (+ - * / and parentheses).

Never `eval`: a small tokenizer and a recursive-descent parser over exact fractions, with
limits on length and nesting so a hostile string cannot cost more than a few microseconds.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_LENGTH = 200
MAX_DEPTH = 20
_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


class ExpressionError(ValueError):
    """The string is not an expression this evaluator accepts; the message says where."""


def tokenize(text: str) -> list[str]:
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters")
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if not match:
            raise ExpressionError(f"unexpected character {text[position]!r} at {position}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


def evaluate(text: str) -> Fraction:
    """Value of the expression; ExpressionError for anything malformed or dividing by 0."""
    parser = _Parser(tokenize(text))
    value = parser.expression(0)
    if parser.position != len(parser.tokens):
        raise ExpressionError(f"unexpected {parser.tokens[parser.position]!r} after the expression")
    return value


def numbers_used(text: str) -> list[int]:
    return [int(token) for token in tokenize(text) if token.isdigit()]


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.position += 1
        return token

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            value = value + self.term(depth) if self._take() == "+" else value - self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            operator, right = self._take(), self.factor(depth)
            if operator == "/" and right == 0:
                raise ExpressionError("division by zero")
            value = value * right if operator == "*" else value / right
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"more than {MAX_DEPTH} nested parentheses")
        token = self._take()
        if token == "(":
            value = self.expression(depth + 1)
            if self._peek() != ")":
                raise ExpressionError("missing ')'")
            self._take()
            return value
        if token == "-":
            return -self.factor(depth + 1)
        if token.isdigit():
            return Fraction(int(token))
        raise ExpressionError(f"unexpected {token!r}")
