from __future__ import annotations

import json
import random

import pytest

from respec.tasks import make_task
from respec.tasks.arithmetic import worked_steps
from respec.tasks.dataset import DatasetError
from respec.tasks.expression import evaluate
from respec.tasks.math_answer import answers_match, extract_answer


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "arithmetic+countdown"])
def test_worked_solutions_are_correct_and_problems_reproducible(name):
    task = make_task(name)
    problems = [task.sample(random.Random(seed)) for seed in range(200)]
    assert all(task.check(p.solution, p).correct for p in problems)
    assert problems[:5] == [task.sample(random.Random(seed)) for seed in range(5)]
    assert task.heldout(20) == task.heldout(20)  # a fixed held-out set


def test_arithmetic_answers_follow_precedence():
    task = make_task("arithmetic", max_operands=4)
    for seed in range(200):
        problem = task.sample(random.Random(seed))
        assert evaluate(problem.prompt.rstrip("=")) == int(problem.answer)
    assert worked_steps([2, 3, 4], ["+", "*"]) == (["3*4=12", "2+12=14"], 14)


def test_arithmetic_checker():
    task = make_task("arithmetic")
    problem = task.sample(random.Random(1))
    wrong = str(int(problem.answer) + 1)
    assert not task.check(f"A:{wrong}", problem).correct
    assert task.check(f"junk;A:{wrong};A:{problem.answer}", problem).correct  # the last answer counts
    assert task.check("no answer at all", problem).reward == 0.0


def test_countdown_checker_rules():
    task = make_task("countdown")
    problem = task.sample(random.Random(3))
    numbers = problem.meta["numbers"]
    assert task.check(problem.solution, problem).reward == 1.0
    reuse = f"{numbers[0]}*{numbers[0]}*{numbers[0]}"
    if numbers.count(numbers[0]) < 3:
        assert task.check(reuse, problem).error.startswith("uses a number not given")
    assert task.check("__import__('os').system('x')", problem).error.startswith("not an expression")
    near = f"{numbers[0]}"
    if int(near) != int(problem.answer):
        assert task.check(near, problem).reward == pytest.approx(0.1)


def test_unknown_task_and_bad_parameters():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        make_task("chess")
    with pytest.raises(ValueError, match="task 'arithmetic'"):
        make_task("arithmetic", colour=3)


@pytest.mark.parametrize("response, reference, correct", [
    ("so the answer is \\boxed{42}.", "42", True), ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("it is 1,000 apples", "1000", True), ("first 3 then 7", "7", True), ("2/4", "1/2", True),
    ("\\boxed{41}", "42", False), ("nothing", "1", False),
])
def test_math_answers(response, reference, correct):
    assert answers_match(extract_answer(response), reference) is correct


def test_dataset_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task("dataset", path=str(path))
    problem = task.sample(random.Random(0))
    assert task.check(f"The answer is \\boxed{{{problem.answer}}}", problem).correct
    assert len(task.heldout(100)) == 2 and not set(p.prompt for p in task.heldout(100)) & set(
        p.prompt for p in task.train_problems)


def test_dataset_row_without_answer_is_a_clear_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(DatasetError, match=r"data.jsonl:2: row has no 'answer'"):
        make_task("dataset", path=str(path))
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        task = make_task("dataset", path=str(path), skip_invalid=True)
    assert len(task.train_problems) == 1
    with pytest.raises(DatasetError, match="no such dataset file"):
        make_task("dataset", path=str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: not valid JSON"):
        make_task("dataset", path=str(tmp_path / "bad.jsonl"))


def test_user_reward_function_by_import_path():
    task = make_task("arithmetic", reward_fn="tests.tasks.rewards:length_reward")
    problem = task.sample(random.Random(0))
    assert task.check("abc", problem).reward == 3.0
    with pytest.raises(ValueError, match="has no function 'nope'"):
        make_task("arithmetic", reward_fn="tests.tasks.rewards:nope")
    with pytest.raises(ValueError, match="cannot import"):
        make_task("arithmetic", reward_fn="no.such.module:f")
