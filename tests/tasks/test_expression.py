from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.tasks.expression import ExpressionError, evaluate, numbers_used


def expressions(depth: int = 3):
    """(text, exact value) pairs built as trees, so the oracle needs no eval."""
    leaf = st.integers(0, 99).map(lambda n: (str(n), Fraction(n)))
    if depth == 0:
        return leaf

    def combine(args):
        (a, va), op, (b, vb) = args
        if op == "/" and vb == 0:
            op = "+"
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else 0}[op]
        return f"({a}){op}({b})", value

    node = st.tuples(expressions(depth - 1), st.sampled_from("+-*/"), expressions(depth - 1)).map(combine)
    return st.one_of(leaf, node)


@given(expressions())
@settings(max_examples=300, deadline=None)
def test_value_of_generated_expressions(pair):
    text, value = pair
    assert evaluate(text) == value


@given(st.text(max_size=60))
@settings(max_examples=500, deadline=None)
def test_any_string_evaluates_or_raises_expression_error(text):
    try:
        evaluate(text)
    except ExpressionError:
        pass


@pytest.mark.parametrize("text, value", [("2+3*4", 14), ("(2+3)*4", 20), ("8/4/2", 1), ("-3+5", 2),
                                         ("7-2-1", 4), (" 1 + 2 ", 3)])
def test_precedence_and_associativity(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize("text, message", [
    ("__import__('os')", "unexpected character"), ("1/0", "division by zero"), ("2+", "ends too early"),
    ("(1+2", "missing"), ("1 2", "after the expression"), ("(" * 30 + "1" + ")" * 30, "nested"),
    ("1+" * 150 + "1", "longer than"), ("2**3", "unexpected '\\*'"),
])
def test_errors(text, message):
    with pytest.raises(ExpressionError, match=message):
        evaluate(text)


def test_numbers_used():
    assert numbers_used("25+3*(7-3)") == [25, 3, 7, 3]
