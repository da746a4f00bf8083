"""A user's dataset: a local JSONL or Parquet file with `prompt` and `answer` fields, or
in verl's layout (`prompt` as chat messages, `reward_model.ground_truth`, `data_source`;
see ``respec.interop.verl_parquet``), told apart row by row.

Every row is checked when the file is loaded, so a bad row stops the run before any
compute is spent, with the file, the row and the problem in the message (or, with
`skip_invalid`, is skipped with a warning that counts them).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

# The module, not its names: verl_parquet imports respec.tasks.base, so entering through it
# runs this package's __init__ (and this file) while verl_parquet is still half-imported.
from respec.interop import verl_parquet as verl
from respec.tasks.base import CheckResult, Problem, Task
from respec.tasks.math_answer import answers_match, extract_answer


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and the row."""


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DatasetError(f"{path}: expected a .jsonl or .parquet file")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{number}: not valid JSON: {error}") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow: pip install 'respec[parquet]'") from None
    return parquet.read_table(path).to_pylist()


def to_problem(row: object, where: str, render=None) -> Problem:
    """A row of respec's own layout, or of verl's (chat messages rendered by `render`)."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be an object with 'prompt' and 'answer'")
    if verl.is_verl_row(row):
        try:
            return verl.verl_problem(row, render or verl.plain_render)
        except verl.VerlRowError as error:
            raise DatasetError(f"{where}: verl layout: {error}") from None
    for key in ("prompt", "answer"):
        if row.get(key) is None or str(row[key]).strip() == "":
            raise DatasetError(f"{where}: row has no {key!r}")
    return Problem(prompt=str(row["prompt"]), answer=str(row["answer"]),
                   solution=str(row.get("solution", "")))


class Dataset(Task):
    """Problems from a file, drawn at random; numeric / \\boxed{} answers."""

    name = "dataset"

    def __init__(self, path: str, skip_invalid: bool = False, heldout_fraction: float = 0.1,
                 chat_template: str = "") -> None:
        """chat_template: a local tokenizer directory whose chat template renders verl rows'
        messages ("" = their contents joined by blank lines)."""
        self.path = Path(path)
        render = verl.template_render(chat_template) if chat_template else verl.plain_render
        problems, skipped = [], []
        for number, row in enumerate(read_rows(self.path), 1):
            try:
                problems.append(to_problem(row, f"{self.path}:{number}", render))
            except DatasetError as error:
                if not skip_invalid:
                    raise
                skipped.append(str(error))
        if skipped:
            warnings.warn(f"{self.path}: skipped {len(skipped)} invalid rows, first: {skipped[0]}",
                          stacklevel=2)
        if not problems:
            raise DatasetError(f"{self.path}: no usable rows")
        cut = max(1, int(len(problems) * heldout_fraction)) if len(problems) > 1 else 0
        self.heldout_problems, self.train_problems = problems[:cut], problems[cut:] or problems

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self.train_problems)

    def heldout(self, count: int, seed: int = 12345) -> list[Problem]:
        return self.heldout_problems[:count]

    def check(self, response: str, problem: Problem) -> CheckResult:
        correct = answers_match(extract_answer(response), problem.answer)
        return CheckResult(1.0 if correct else 0.0, correct)
