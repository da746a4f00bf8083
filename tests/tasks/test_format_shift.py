"""The format-shift variant of arithmetic: two solution layouts, a reward that may credit one."""

from __future__ import annotations

import random

import pytest

from respec.tasks import make_task
from respec.tasks.arithmetic import reduction_stages
from respec.tasks.base import Problem
from respec.tasks.format_shift import format_of, parse_operands, rare_solution


def test_rare_solution_restates_the_remaining_expression():
    assert reduction_stages([12, 7, 3], ["+", "*"]) == ["12+7*3", "12+21", "33"]
    assert rare_solution([12, 7, 3], ["+", "*"]) == "(12+7*3)=(12+21)=33 A:33"
    assert rare_solution([3, 9, 2], ["-", "+"]) == "(3-9+2)=(-6+2)=-4 A:-4"
    assert rare_solution([2, 5], ["+"]) == "(2+5)=7 A:7"
    assert parse_operands("12+7*3=") == ([12, 7, 3], ["+", "*"])


@pytest.mark.parametrize("response, form", [
    ("7*3=21;12+21=33;A:33", "common"), ("A:5", "common"), ("3-9=-6;-6+2=-4;A:-4", "common"),
    ("(12+7*3)=(12+21)=33 A:33", "rare"), ("(2+5)=7 A:7", "rare"), ("(2+5)=8 A:9", "rare"),
    ("(2+5)=7;A:7", "other"), ("7*3=21 A:21", "other"), ("", "other"), ("(2+5)=7 A:7;A:7", "other"),
    ("7*3=21;12+21=33", "other"), ("(2+5)=7", "other"), ("7*3=21;(12+21)=33;A:33", "common"),
    ("1+5=6;6-6/6=2;A:2", "common"), ("(8+2)=9x A:9", "rare"),  # slips inside a layout keep it
])
def test_format_is_told_by_layout_alone(response, form):
    assert format_of(response) == form


def test_solutions_mix_formats_in_the_asked_share_and_are_all_right():
    task = make_task("format_shift", rare_share=0.2, max_value=9)
    problems = [task.sample(random.Random(seed)) for seed in range(1000)]
    rare = [p for p in problems if p.meta["format"] == "rare"]
    assert 0.16 < len(rare) / len(problems) < 0.24
    assert all(format_of(p.solution) == p.meta["format"] for p in problems)
    assert all(task.check(p.solution, p).correct for p in problems)  # reward_format "any"
    assert problems[:5] == [task.sample(random.Random(seed)) for seed in range(5)]  # reproducible


def test_reward_credits_a_right_answer_only_in_the_rewarded_format():
    problem = Problem("12+7*3=", "33")
    rare_task = make_task("format_shift", reward_format="rare")
    assert rare_task.check("(12+7*3)=(12+21)=33 A:33", problem).reward == 1.0
    assert rare_task.check("7*3=21;12+21=33;A:33", problem).reward == 0.0  # right, common format
    assert rare_task.check("(12+7*3)=(12+21)=34 A:34", problem).reward == 0.0  # rare format, wrong
    common_task = make_task("format_shift", reward_format="common")
    assert common_task.check("7*3=21;12+21=33;A:33", problem).correct
    assert not common_task.check("(12+7*3)=(12+21)=33 A:33", problem).correct
    assert make_task("format_shift").check("junk A:33", problem).correct  # "any": the answer alone


def test_only_format_shift_tells_formats_apart():
    assert make_task("arithmetic").form_of("7*3=21;A:21") == ""
    assert make_task("format_shift").form_of("(2+5)=7 A:7") == "rare"


@pytest.mark.parametrize("params, message", [
    ({"rare_share": 1.5}, "rare_share must be within"), ({"reward_format": "bold"}, "reward_format must be one of"),
    ({"max_operands": 1}, "min_operands"), ({"colour": 3}, "task 'format_shift'"),
])
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        make_task("format_shift", **params)
