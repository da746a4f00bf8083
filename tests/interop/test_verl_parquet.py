"""verl's Parquet layout (chat-message prompt, reward_model.ground_truth, data_source) read by
the dataset task: rows as verl's GSM8K preprocessing writes them, written here with pyarrow."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from respec.engine.tokenizer import char_tokenizer
from respec.tasks import make_task
from respec.tasks.dataset import DatasetError


def verl_row(index: int, split: str = "train") -> dict:
    question = f"What is {index} + {index}?"
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "system", "content": "Answer with a number."},
                   {"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * index)},
        "extra_info": {"split": split, "index": index, "question": question},
    }


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_rows_become_problems(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [verl_row(i) for i in range(20)])
    task = make_task("dataset", path=str(path))
    assert len(task.train_problems) == 18 and len(task.heldout(100)) == 2
    problem = task.train_problems[0]
    index = problem.meta["extra_info"]["index"]
    assert problem.prompt == f"Answer with a number.\n\nWhat is {index} + {index}?"
    assert problem.answer == str(2 * index)
    assert problem.meta["data_source"] == "openai/gsm8k" and problem.meta["ability"] == "math"
    assert problem.meta["messages"][1] == {"role": "user", "content": f"What is {index} + {index}?"}
    sampled = task.sample(random.Random(0))
    assert task.check(f"so \\boxed{{{sampled.answer}}}", sampled).correct
    assert not task.check("\\boxed{-1}", sampled).correct


def test_verl_rows_are_rendered_with_a_chat_template(tmp_path):
    tokenizer_dir = char_tokenizer().save(tmp_path / "tokenizer")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_parquet(tmp_path / "train.parquet", [verl_row(3), verl_row(4)])
    task = make_task("dataset", path=str(path), chat_template=str(tokenizer_dir))
    prompts = {p.prompt for p in task.train_problems + task.heldout(10)}
    assert "<system>Answer with a number.\n<user>What is 3 + 3?\n<assistant>" in prompts


def test_verl_and_respec_rows_mix_in_jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [verl_row(1), {"prompt": "1+1?", "answer": "2"}]))
    task = make_task("dataset", path=str(path), heldout_fraction=0.0)
    assert {p.answer for p in task.train_problems + task.heldout_problems} == {"2"}


@pytest.mark.parametrize("change, message", [
    ({"reward_model": {"style": "rule"}}, "'reward_model' must be an object with 'ground_truth'"),
    ({"prompt": []}, "'prompt' must be a non-empty list"),
    ({"prompt": [{"role": "narrator", "content": "x"}]}, "role 'narrator'"),
    ({"reward_model": {"style": "rule", "ground_truth": ["1", "2"]}}, "one non-empty string or number"),
])
def test_broken_verl_rows_are_refused_with_the_row_and_field(tmp_path, change, message):
    # JSONL: a Parquet column cannot hold these mixed types, the same checks run on both.
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [verl_row(1), {**verl_row(2), **change}]))
    with pytest.raises(DatasetError, match=rf"bad.jsonl:2: verl layout: .*{message}"):
        make_task("dataset", path=str(path))


def test_a_parquet_row_without_ground_truth_is_refused(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [verl_row(1), {**verl_row(2), "reward_model": None}])
    with pytest.raises(DatasetError, match=r"bad.parquet:2: verl layout: 'reward_model' must be"):
        make_task("dataset", path=str(path))


def test_the_verl_module_imports_on_its_own():
    """A fresh interpreter importing it first (no respec.tasks before it) must not hit the
    import cycle through respec.tasks.dataset."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import respec.interop.verl_parquet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
