"""vLLM (respec.interop.vllm_engine) against respec's own engine on the same weights:
greedy tokens equal, before and after an in-place weight update, and behaviour log-probs
equal to respec.engine.sampling's on the same logits. One engine for the module (its
start is the slow part); each test loads the weights it checks first."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")  # `make test` (.venv, no vLLM) skips this module

import math

import numpy as np
import torch

from respec.engine.sampling import target_probs
from respec.interop.vllm_engine import EngineOptions, VllmEngine, check_sampling
from respec.messages import SamplingParams
from tests.vllm_backend.policy import VOCAB, perturbed, respec_behaviour, respec_greedy, tiny_policy

PROMPTS = [[1, 5, 9, 13], [2, 7], [3, 11, 19, 23, 29, 31], [4, 4, 4]]
MAX_NEW = 24


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    v1 = tiny_policy(root / "v1")
    return v1, perturbed(v1, root / "v2")


@pytest.fixture(scope="module")
def engine(policies):
    return VllmEngine(EngineOptions(model_path=str(policies[0]), max_len=128, max_rows=8))


def generate(engine: VllmEngine, prompts: list[list[int]], sampling: list[SamplingParams]) -> list[dict]:
    """Every prompt to completion through the step loop the actor uses."""
    rows = {f"r{i}": {"tokens": [], "logprobs": [], "finish_reason": None} for i in range(len(prompts))}
    for index, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
        engine.add(f"r{index}", prompt, params)
    while engine.has_work():
        for delta in engine.step():
            row = rows[delta.request_id]
            row["tokens"] += delta.tokens
            row["logprobs"] += delta.logprobs
            row["finish_reason"] = delta.finish_reason or row["finish_reason"]
    return [rows[f"r{i}"] for i in range(len(prompts))]


def greedy(engine: VllmEngine) -> list[dict]:
    return generate(engine, PROMPTS, [SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)] * len(PROMPTS))


def assert_same(vllm_rows: list[dict], respec_rows: list[dict]) -> None:
    for v, r in zip(vllm_rows, respec_rows, strict=True):
        assert v["tokens"] == r["tokens"]
        np.testing.assert_allclose(v["logprobs"], r["logprobs"], atol=2e-4)


def test_greedy_outputs_equal_respec_on_the_same_weights(engine, policies):
    engine.load_policy(policies[0] / "model.safetensors", 1)
    rows = greedy(engine)
    assert all(len(r["tokens"]) == MAX_NEW and r["finish_reason"] == "length" for r in rows)
    assert_same(rows, respec_greedy(policies[0], PROMPTS, MAX_NEW))


def test_in_place_weight_update_gives_respec_outputs_on_the_new_weights(engine, policies):
    v1, v2 = policies
    engine.load_policy(v1 / "model.safetensors", 1)
    before = greedy(engine)
    assert engine.load_policy(v2, 2) == 2 + 2 * 12  # embeddings, final norm, 12 tensors per layer
    assert engine.version == 2
    after = greedy(engine)
    assert sum(a["tokens"] != b["tokens"] for a, b in zip(before, after, strict=True)) >= 2  # it did change
    # without the tied lm_head re-pack (vllm_worker) this differs: logits keep the old embedding
    assert_same(after, respec_greedy(v2, PROMPTS, MAX_NEW))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_behaviour_logprobs_equal_respec_sampling_on_the_same_logits(engine, policies, temperature):
    """Sampled rows (with a greedy row in the same batch, which vLLM processes differently)
    carry log_softmax(logits / T)[token], respec's behaviour log-prob."""
    v2 = policies[1]
    engine.load_policy(v2, 3)
    sampling = [SamplingParams(temperature=temperature, max_new_tokens=16)] * 3 + [
        SamplingParams(temperature=0.0, max_new_tokens=16)]
    rows = generate(engine, PROMPTS, sampling)
    for prompt, params, row in zip(PROMPTS, sampling, rows, strict=True):
        expected = respec_behaviour(v2, prompt, row["tokens"], params.temperature)
        np.testing.assert_allclose(row["logprobs"], expected.numpy(), atol=2e-4)
    sampled = [t for row in rows[:3] for t in row["tokens"]]
    assert len(set(sampled)) > 8  # it sampled, not decoded greedily


def test_top_k_logprobs_are_truncated_so_the_backend_refuses_top_k(engine, policies):
    """What vLLM reports under top-k is log p(token | top-k set): not respec's untruncated
    behaviour log-prob. That is why check_sampling refuses top-k/top-p prompts."""
    v1 = policies[0]
    engine.load_policy(v1 / "model.safetensors", 4)
    params = SamplingParams(temperature=1.0, top_k=5, max_new_tokens=12)
    row = generate(engine, PROMPTS[:1], [params])[0]
    from tests.vllm_backend.policy import respec_logits

    logits = respec_logits(v1, PROMPTS[0], row["tokens"])
    n = len(row["tokens"])
    probs = target_probs(logits, torch.ones(n), torch.full((n,), 5), torch.ones(n))
    truncated = probs.gather(-1, torch.tensor(row["tokens"])[:, None]).squeeze(-1).log()
    np.testing.assert_allclose(row["logprobs"], truncated.numpy(), atol=2e-4)
    untruncated = respec_behaviour(v1, PROMPTS[0], row["tokens"], 1.0)
    assert float((truncated - untruncated).min()) > 1e-3  # the top-5 set never holds all the mass here
    with pytest.raises(ValueError, match="top_k=5"):
        check_sampling(params)


def test_vocabulary_size_is_the_checkpoints(engine):
    assert engine.vocab_size == VOCAB and math.isfinite(engine.version)
