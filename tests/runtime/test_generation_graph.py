"""Generator and Verifier as actors: the same tokens as the in-process engine, in one
process (inproc) and split over two processes (ipc), with and without SD, with the n-gram
drafter and with an EAGLE head fed the Verifier's target features.

Runs use one thread per group: on the 2-core machine two torch processes with default
threads made each run about 4x slower (16 s against 4 s measured)."""

from __future__ import annotations

import json

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleDrafter, EagleHead
from respec.engine.speculative import Sampling, SpeculativeEngine
from tests.checkpoints import small_qwen2
from tests.heads import saved_distilled_head

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    }, name=f"gen_{verifier_group}_{shape}", threads_per_group=1)
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


# ---------------------------------------------------------------------- EAGLE through the actors

WINDOW = 6


@pytest.fixture(scope="module")
def eagle_head_dir(tmp_path_factory, checkpoint):
    """A head briefly distilled on the target's greedy continuations of other prompts, saved."""
    return saved_distilled_head(checkpoint, tmp_path_factory.mktemp("eagle") / "head")


@pytest.mark.parametrize("verifier_group, shape", [("main", "s4_t1_n4"), ("target", "s3_t2_n6")])
def test_eagle_drafter_through_the_actors_generates_what_the_engine_generates(
        run_graph, tmp_path, checkpoint, eagle_head_dir, verifier_group, shape):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    out = tmp_path / "rollouts.json"
    result = run_graph({
        "source": {"class": "tests.runtime.sd_actors.FixedPrompts",
                   "params": {"prompts_file": str(tmp_path / "prompts.json"), "max_new_tokens": 20}},
        "generator": {"class": "respec.actors.generator.Generator",
                      "params": {"max_rows": 3, "shape": shape, "drafter": "eagle", "model_path": str(checkpoint),
                                 "draft_path": str(eagle_head_dir), "feature_window": WINDOW}},
        "verifier": {"class": "respec.actors.verifier.Verifier", "group": verifier_group,
                     "params": {"model_path": str(checkpoint), "max_rows": 3, "max_len": 64}},
        "sink": {"class": "tests.runtime.sd_actors.RolloutFile",
                 "params": {"out_file": str(out), "expected": len(PROMPTS)}},
    }, name=f"eagle_{verifier_group}_{shape}", threads_per_group=1)
    assert result.ok, result.reason
    rollouts = json.loads(out.read_text())
    model = load_model(checkpoint)
    greedy = Sampling(temperature=0.0, max_new_tokens=20)
    prompts = [torch.tensor(p) for p in PROMPTS]
    drafter = EagleDrafter(model, EagleHead.load(eagle_head_dir, model), feature_window=WINDOW)
    speculative = SpeculativeEngine(model, drafter, max_rows=3, max_len=64).generate(
        prompts, greedy, DraftShape.parse(shape))
    plain = SpeculativeEngine(model, None, max_rows=3, max_len=64).generate(prompts, greedy)
    for index, (sd_row, plain_row) in enumerate(zip(speculative, plain, strict=True)):
        got = rollouts[f"p{index}"]
        assert got["tokens"] == sd_row.tokens == plain_row.tokens
        assert got["logprobs"] == pytest.approx(sd_row.logprobs, abs=1e-4)
    mean_accept = sum(r["accept_len"] for r in rollouts.values()) / len(rollouts)
    engine_accept = sum((len(r.tokens) - 1) / max(r.steps, 1) for r in speculative) / len(speculative)
    assert mean_accept > 1.5  # the trained head's drafts are accepted: features reach it aligned
    assert mean_accept == pytest.approx(engine_accept, rel=0.15)


# ---------------------------------------------------------------------- the Generator's target parts


def test_generator_loads_only_the_shared_target_parts_and_refreshes_them_from_policy_weights(
        tmp_path, checkpoint, eagle_head_dir):
    """The head's embeddings, norm and lm_head come from the checkpoint (decoder layers never
    loaded) and follow each PolicyWeights, so drafts are those of a head on the new policy."""
    import asyncio
    from types import SimpleNamespace

    import structlog
    from safetensors.torch import save_file

    from respec.actors.generator import Generator
    from respec.engine.drafters.base import DraftRequest
    from respec.messages import PolicyWeights, WeightsHandle

    parts = load_model(checkpoint, decoder_layers=False)
    full = load_model(checkpoint)
    assert all(p.is_meta for p in parts.model.layers.parameters())
    assert torch.equal(parts.embed_tokens.weight, full.embed_tokens.weight)
    assert torch.equal(parts.lm_head.weight, full.lm_head.weight)

    params = Generator.Params(drafter="eagle", model_path=str(checkpoint), draft_path=str(eagle_head_dir),
                              feature_window=WINDOW)
    actor = Generator(params, SimpleNamespace(instance="generator/0", log=structlog.get_logger()))
    asyncio.run(actor.on_start())
    assert actor.capture_layers == actor.book.drafter.capture_layers

    torch.manual_seed(7)
    new_policy = load_model(checkpoint)
    with torch.no_grad():
        for parameter in new_policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    save_file({k: v.contiguous() for k, v in new_policy.state_dict().items()}, tmp_path / "policy-v1.safetensors")
    weights = PolicyWeights(version=1, handle=WeightsHandle(kind="file", location=str(tmp_path / "policy-v1.safetensors")))
    asyncio.run(actor.on_policy_weights(weights, None))

    reference = EagleDrafter(new_policy, EagleHead.load(eagle_head_dir, new_policy), feature_window=WINDOW)
    history = torch.tensor([1, 2, 3, 1, 2, 3, 1])
    with torch.no_grad():
        features = torch.cat(new_policy(history[None, :-1], capture_layers=reference.capture_layers).captured, -1)
    request = DraftRequest([history], features, [0], DraftShape.parse("s3_t2_n6"))
    got, want = actor.book.drafter.propose(request).tree, reference.propose(request).tree
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
    before = EagleDrafter(full, EagleHead.load(eagle_head_dir, full), feature_window=WINDOW).propose(request).tree
    assert not torch.equal(before.tokens, want.tokens)  # the refresh mattered
