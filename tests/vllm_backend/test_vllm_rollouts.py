"""The VllmRollouts actor in running graphs: rollouts equal respec's engine token for
token, bad prompts come back as "error" Rollouts, and in the RL loop every token carries
the policy version that produced it (the synchronous loop trains on no stale token)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")  # `make test` (.venv, no vLLM) skips this module

import asyncio
import json

import numpy as np
import yaml

from respec.actors.vllm_rollouts import VllmRollouts
from respec.messages import Envelope, PolicyWeights
from respec.runtime import handles
from respec.runtime.launcher import run_file
from tests.runtime.test_rl_run import rl_config, step_rows
from tests.vllm_backend.policy import (
    VOCAB,
    char_policy,
    respec_behaviour,
    respec_greedy,
    tiny_policy,
)

ROLLOUTS = "respec.actors.vllm_rollouts.VllmRollouts"
ACTORS = "tests.runtime.sd_actors"


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.mark.parametrize("speculative", [{}, NGRAM], ids=["no_sd", "vllm_ngram"])
def test_rollouts_equal_respec_and_bad_prompts_come_back_as_errors(tmp_path, speculative):
    """Greedy rows equal respec's engine, sampled rows carry respec's behaviour log-probs;
    with vLLM's n-gram SD, greedy prompts only (it mis-samples: docs/VLLM.md)."""
    policy = tiny_policy(tmp_path / "policy")
    good = [[1, 5, 9, 13], [2, 7], [3, 11, 19, 23, 29, 31], [4, 4, 4, 4, 4]]
    entries = [{"tokens": t, "sampling": {"max_new_tokens": 12}} for t in good] + [
        {"tokens": [1, VOCAB + 3]},  # outside the vocabulary
        {"tokens": [1, 2], "sampling": {"temperature": 1.0, "top_k": 4}},  # truncated log-probs: refused
        {"tokens": [1, 2], "sampling": {"max_new_tokens": 200}},  # longer than max_len
        {"tokens": [5, 6, 7], "sampling": {"temperature": 0.7, "max_new_tokens": 20}},  # refused with SD
        {"tokens": [5, 6, 7], "sampling": {"temperature": 1.0, "max_new_tokens": 20}},  # refused with SD
    ]
    rollouts = run_rollouts(tmp_path, policy, entries, speculative)
    assert [rollouts[f"p{i}"]["tokens"] for i in range(len(good))] == [
        row["tokens"] for row in respec_greedy(policy, good, 12)]
    for index, prompt in enumerate(good):
        got = rollouts[f"p{index}"]
        assert got["finish_reason"] == "length" and got["versions"] == [0] * 12
        behaviour = respec_behaviour(policy, prompt, got["tokens"], 1.0)  # greedy: T = 1 in the log-prob
        np.testing.assert_allclose(got["logprobs"], behaviour.numpy(), atol=2e-4)
    if speculative:  # vLLM's drafts were accepted: more than one token per step somewhere
        assert max(rollouts[f"p{i}"]["accept_len"] for i in range(len(good))) > 1.0
    errors = {key: rollouts[f"p{key}"]["error"] for key in (4, 5, 6)}
    assert all(rollouts[f"p{key}"]["finish_reason"] == "error" for key in errors)
    assert f"outside the model's vocabulary [0, {VOCAB})" in errors[4]
    assert "top_k=4" in errors[5]
    assert "needs 203 positions; the cache holds 64" in errors[6]
    for key, temperature in ((7, 0.7), (8, 1.0)):
        got = rollouts[f"p{key}"]
        if speculative:
            assert got["finish_reason"] == "error" and f"temperature={temperature}" in got["error"]
        else:
            behaviour = respec_behaviour(policy, entries[key]["tokens"], got["tokens"], temperature)
            np.testing.assert_allclose(got["logprobs"], behaviour.numpy(), atol=2e-4)


def run_rollouts(tmp_path, policy, entries: list[dict], speculative: dict) -> dict:
    """PromptsWithSampling -> VllmRollouts -> RolloutFile, in a real run; the rollouts by id."""
    (tmp_path / "prompts.json").write_text(json.dumps(entries))
    out = tmp_path / "rollouts.json"
    params = {"model_path": str(policy), "max_rows": 4, "max_len": 64, "speculative": speculative}
    config = {"run": {"name": "vllm_rollouts", "runs_dir": str(tmp_path / "runs"), "timeout_s": 240},
              "actors": {
                  "prompts": {"class": f"{ACTORS}.PromptsWithSampling",
                              "params": {"prompts_file": str(tmp_path / "prompts.json")}},
                  "generator": {"class": ROLLOUTS, "params": params},
                  "sink": {"class": f"{ACTORS}.RolloutFile", "params": {"out_file": str(out), "expected": len(entries)}},
              }}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_file(path, progress=False)
    assert result.ok, result.reason
    return json.loads(out.read_text())


class LateWeightsRollouts(VllmRollouts):
    """VllmRollouts whose policy weights take `delay_s` to arrive (loaded that long after
    they were received, between engine steps), so the next step's prompts overtake them:
    the race the staleness bound must survive (tests/runtime/test_policy_version_gate.py)."""

    class Params(VllmRollouts.Params, frozen=True, forbid_unknown_fields=True):
        delay_s: float = 0.5

    @handles(PolicyWeights, optional=True)
    async def on_policy_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        load = VllmRollouts.on_policy_weights(self, weights, envelope)
        asyncio.get_running_loop().call_later(self.params.delay_s, asyncio.ensure_future, load)


def test_rl_loop_with_the_vllm_backend_trains_on_versioned_tokens(tmp_path):
    """Synchronous loop (max_staleness 0), trainer in its own process (weights as files),
    weights arriving after the prompts that need them: the prompts wait, and each step's
    tokens all come from the policy version just before it."""
    path = rl_config(tmp_path, char_policy(tmp_path / "policy"), "vllm_rl", steps=3, staleness=0)
    config = yaml.safe_load(path.read_text())
    del config["actors"]["verifier"]
    config["actors"]["generator"] = {"class": "tests.vllm_backend.test_vllm_rollouts.LateWeightsRollouts",
                                     "params": {"model_path": str(tmp_path / "policy"), "max_rows": 8, "max_len": 64}}
    config["actors"]["trainer"]["group"] = "trainer"
    config["run"]["startup_timeout_s"] = 180  # vLLM's start beside the trainer's, on a busy 2-core machine
    path.write_text(yaml.safe_dump(config))
    result = run_file(path, progress=False)
    assert result.ok, result.reason
    steps = step_rows(result.run_dir)
    assert [r["groups"] for r in steps] == [[0, 1], [2, 3], [4, 5]]
    assert all(r["staleness_max"] == 0 and r["generation_errors"] == 0 for r in steps), steps
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    loaded = [e["version"] for e in log if e["event"] == "policy_weights_loaded"]
    assert loaded[:2] == [1, 2]  # the versions the trainer published, loaded in place, in order
    waits = [e for e in log if e["event"] == "waiting_for_policy_version"]
    assert waits, "the late weights never made a prompt wait: the race was not forced"
    assert {1, 2} <= {e["needs"] for e in waits} and all(e["loaded"] < e["needs"] for e in waits)
