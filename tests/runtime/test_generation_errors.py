"""Bad input through the Generator and Verifier actors.

A bad prompt (too long for the cache, invalid sampling parameters, empty, ids outside the
vocabulary) is refused on its own: its Rollout says "error" and why, and every other row of
the same steps completes with exactly the tokens of plain greedy decoding. A checkpoint or
tokenizer that cannot be used stops the run at start with a reason naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.engine.tokenizer import char_tokenizer
from tests.checkpoints import small_qwen2

MAX_LEN = 64
GOOD = {"p3": [1, 2, 3, 1, 2, 3, 1], "p5": [5, 6, 5, 6], "p7": [7, 8, 9, 10, 7, 8], "p11": [3, 3, 3]}
BAD = {  # prompt id -> (prompt entry, what the error must say)
    "p0": ({"tokens": list(range(1, 40)) * 2}, "CacheFullError: a prompt of 78 tokens"),
    "p1": ({"tokens": [1, 2], "sampling": {"temperature": -0.5}}, "temperature must be >= 0"),
    "p2": ({"tokens": []}, "empty prompt"),
    "p4": ({"tokens": [1, 2], "sampling": {"top_p": 0.0}}, "top_p must be in (0, 1]"),
    "p6": ({"tokens": [1, 2], "sampling": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
    "p8": ({"tokens": [1, 2], "sampling": {"top_k": -3}}, "top_k must be an integer >= 0"),
    "p9": ({"tokens": [1, 40, 2]}, "prompt token 40 at position 1 is outside the model's vocabulary [0, 40)"),
    "p10": ({"tokens": [1, 2], "sampling": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_qwen2(tmp_path_factory.mktemp("ckpt") / "model")


def graph(source_params: dict, model_path: str, expected: int, out, verifier_group: str = "main") -> dict:
    return {
        "source": {"class": "tests.runtime.sd_actors.PromptsWithSampling", "params": source_params},
        # EAGLE with a fresh head: rejected rows must not shift the features of the others
        "generator": {"class": "respec.actors.generator.Generator",
                      "params": {"max_rows": 3, "shape": "s3_t2_n6", "drafter": "eagle", "model_path": model_path,
                                 "feature_window": 4}},
        "verifier": {"class": "respec.actors.verifier.Verifier", "group": verifier_group,
                     "params": {"model_path": model_path, "max_rows": 3, "max_len": MAX_LEN}},
        "sink": {"class": "tests.runtime.sd_actors.RolloutFile", "params": {"out_file": str(out), "expected": expected}},
    }


def test_bad_prompts_are_refused_one_by_one_and_the_rest_of_the_batch_completes(run_graph, tmp_path, checkpoint):
    entries = {**{k: {"tokens": v, "sampling": {"max_new_tokens": 12}} for k, v in GOOD.items()},
               **{k: entry for k, (entry, _) in BAD.items()}}
    ordered = [entries[f"p{i}"] for i in range(len(entries))]  # the first step's rows are all bad
    (tmp_path / "prompts.json").write_text(json.dumps(ordered))
    out = tmp_path / "rollouts.json"
    result = run_graph(graph({"prompts_file": str(tmp_path / "prompts.json")}, str(checkpoint), len(ordered), out,
                             verifier_group="target"), name="bad_rows", threads_per_group=1)
    assert result.ok, result.reason
    rollouts = json.loads(out.read_text())
    for prompt_id, (_, message) in BAD.items():
        got = rollouts[prompt_id]
        assert got["finish_reason"] == "error" and got["tokens"] == [], prompt_id
        assert message in got["error"], (prompt_id, got["error"])
    engine = SpeculativeEngine(load_model(checkpoint), None, max_rows=3, max_len=MAX_LEN)
    expected = engine.generate([torch.tensor(p) for p in GOOD.values()], Sampling(temperature=0.0, max_new_tokens=12))
    for prompt_id, row in zip(GOOD, expected, strict=True):
        got = rollouts[prompt_id]
        assert got["tokens"] == row.tokens and got["finish_reason"] == "length" and got["error"] == ""
    assert result.stats["verifier/0"]["restarts"] == 0 and result.stats["generator/0"]["restarts"] == 0
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert sorted(e["prompt_id"] for e in log if e["event"] == "prompt_rejected") == sorted(BAD)


def _broken(checkpoint, tmp_path, problem: str):
    """A copy of the checkpoint with one problem; returns (directory, text the reason must hold)."""
    directory = tmp_path / problem
    shutil.copytree(checkpoint, directory)
    if problem == "missing_weights":
        (directory / "model.safetensors").unlink()
        return directory, [str(directory), "no model.safetensors"]
    if problem == "architecture":
        config = json.loads((directory / "config.json").read_text())
        config["architectures"] = ["GPT2LMHeadModel"]
        (directory / "config.json").write_text(json.dumps(config))
        return directory, [str(directory / "config.json"), "GPT2LMHeadModel"]
    char_tokenizer().save(directory)  # ~90 ids for a 40-token model
    return directory, [str(directory / "tokenizer.json"), "vocab_size is 40"]


@pytest.mark.parametrize("problem", ["missing_weights", "architecture", "tokenizer"])
def test_unusable_checkpoint_stops_the_run_at_start_naming_the_file(run_graph, tmp_path, checkpoint, problem):
    directory, must_say = _broken(checkpoint, tmp_path, problem)
    (tmp_path / "prompts.json").write_text(json.dumps([{"tokens": [1, 2, 3]}]))
    actors = graph({"prompts_file": str(tmp_path / "prompts.json")}, str(directory), 1, tmp_path / "out.json")
    actors["generator"]["params"] = {"max_rows": 3, "shape": "nosd", "drafter": "none"}  # the Verifier is at fault
    result = run_graph(actors, name=f"broken_{problem}", threads_per_group=1)
    assert not result.ok and result.exit_code == 1
    assert result.reason.startswith("verifier/0 gave up after 3 restarts")
    for text in must_say:
        assert text in result.reason, result.reason
