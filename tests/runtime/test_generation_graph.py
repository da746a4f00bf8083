"""Generator and Verifier as actors: the same tokens as the in-process engine, in one
process (inproc) and split over two processes (ipc), with and without SD."""

from __future__ import annotations

import json

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.speculative import Sampling, SpeculativeEngine
from tests.checkpoints import small_qwen2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_qwen2(tmp_path_factory.mktemp("ckpt") / "model")


PROMPTS = [[1, 2, 3, 1, 2, 3, 1], [5, 6, 5, 6], [7, 8, 9, 10, 11, 7, 8, 9], [3, 3, 3], [4, 9, 4, 9, 4]]


@pytest.mark.parametrize("verifier_group, shape", [("main", "s4_t1_n4"), ("target", "s3_t2_n6"), ("main", "nosd")])
def test_actor_graph_generates_what_the_engine_generates(run_graph, tmp_path, checkpoint, verifier_group, shape):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    out = tmp_path / "rollouts.json"
    result = run_graph({
        "source": {"class": "tests.runtime.sd_actors.FixedPrompts",
                   "params": {"prompts_file": str(tmp_path / "prompts.json"), "max_new_tokens": 20}},
        "generator": {"class": "respec.actors.generator.Generator", "params": {"max_rows": 3, "shape": shape}},
        "verifier": {"class": "respec.actors.verifier.Verifier", "group": verifier_group,
                     "params": {"model_path": str(checkpoint), "max_rows": 3, "max_len": 64}},
        "sink": {"class": "tests.runtime.sd_actors.RolloutFile",
                 "params": {"out_file": str(out), "expected": len(PROMPTS)}},
    }, name=f"gen_{verifier_group}_{shape}")
    assert result.ok, result.reason
    rollouts = json.loads(out.read_text())
    engine = SpeculativeEngine(load_model(checkpoint), None, max_rows=3, max_len=64)
    expected = engine.generate([torch.tensor(p) for p in PROMPTS], Sampling(temperature=0.0, max_new_tokens=20))
    for index, row in enumerate(expected):
        got = rollouts[f"p{index}"]
        assert got["tokens"] == row.tokens
        assert got["logprobs"] == pytest.approx(row.logprobs, abs=1e-4)
        assert got["versions"] == [0] * len(row.tokens) and got["finish_reason"] == "length"
    mean_accept = sum(r["accept_len"] for r in rollouts.values()) / len(rollouts)
    assert (mean_accept > 1.0) == (shape != "nosd")  # SD really drafted (and plain did not)
