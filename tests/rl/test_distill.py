"""Online distillation pieces: the replay buffer, w(r), a weighted step, held-out acceptance."""

from __future__ import annotations

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleDrafter, EagleHead
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.rl.distill import (
    DistillBuffer,
    Sequence,
    distill_step,
    expected_acceptance,
    heldout_acceptance,
    sample_weights,
)
from tests.checkpoints import small_qwen2
from tests.heads import greedy_distilled_head


def seq(tokens, reward=1.0, group="g0", start=2):
    return Sequence(list(tokens), start, reward, group, 0)


def test_buffer_keeps_the_first_distinct_prompts_apart_and_drops_the_oldest():
    buffer = DistillBuffer(capacity=3, heldout=2)
    for prompt in ([1, 2], [1, 2], [3, 4], [5, 6], [7, 8], [9, 9], [3, 4]):
        buffer.add(seq(prompt + [0, 0]))
    assert buffer.heldout == [[1, 2], [3, 4]]
    assert [s.tokens[:2] for s in buffer.samples] == [[5, 6], [7, 8], [9, 9]]  # [1,2] again and [3,4]: held out
    assert [s.tokens[:2] for s in buffer.heldout_rollouts] == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert buffer.received == 7


def test_reward_and_advantage_weights():
    pool = [seq([1], 1.0, "g0"), seq([1], 0.0, "g0"), seq([1], 1.0, "g1"), seq([1], 1.0, "g1")]
    assert sample_weights(pool, pool, "none").tolist() == [1, 1, 1, 1]
    reward = sample_weights(pool, pool, "reward")  # r / mean(r) = r / 0.75, floored
    assert reward.tolist() == pytest.approx([4 / 3, 0.1, 4 / 3, 4 / 3])
    advantage = sample_weights(pool, pool, "advantage")  # 1 + r - group mean
    assert advantage.tolist() == pytest.approx([1.5, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="reward_weighting must be one of none, reward, advantage"):
        sample_weights(pool, pool, "loss")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_model(small_qwen2(tmp_path_factory.mktemp("policy")))


def greedy_sequences(policy, prompts, new_tokens=16):
    rows = SpeculativeEngine(policy, None, max_rows=len(prompts), max_len=64).generate(
        [torch.tensor(p) for p in prompts], Sampling(temperature=0.0, max_new_tokens=new_tokens))
    return [seq(r.prompt.tolist() + r.tokens, start=len(r.prompt)) for r in rows]


def test_weights_decide_what_the_head_learns(policy):
    """Two groups of sequences; the head trained with weight 5 on one and 0.1 on the other
    ends closer to the policy on the first."""
    generator = torch.Generator().manual_seed(1)
    first, second = ([torch.randint(0, 40, (3,), generator=generator).tolist() for _ in range(8)] for _ in range(2))
    batch = greedy_sequences(policy, first) + greedy_sequences(policy, second)
    weights = torch.tensor([5.0] * 8 + [0.1] * 8)
    torch.manual_seed(0)
    head = EagleHead.for_target(policy)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(60):
        distill_step(head, policy, optimizer, batch, weights, pad_id=0)
    ones = torch.ones(8)
    favoured = distill_step(head, policy, torch.optim.SGD(head.parameters(), lr=0.0), batch[:8], ones, 0)
    neglected = distill_step(head, policy, torch.optim.SGD(head.parameters(), lr=0.0), batch[8:], ones, 0)
    assert favoured < 0.7 * neglected


def test_heldout_acceptance_rises_as_the_head_learns_the_policy(policy):
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    batch = greedy_sequences(policy, prompts, new_tokens=20)
    torch.manual_seed(0)
    head = EagleHead.for_target(policy)
    shape = DraftShape.parse("s4_t1_n4")
    before = heldout_acceptance(policy, head, prompts, shape, 20, ())
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(80):
        distill_step(head, policy, optimizer, batch, torch.ones(len(batch)), pad_id=0, unroll=2)
    after = heldout_acceptance(policy, head, prompts, shape, 20, ())
    assert 1.0 <= before < 1.5 and after > before + 1.0
    assert heldout_acceptance(policy, head, [], shape, 20, ()) == 0.0


@pytest.fixture(scope="module")
def sharp_policy_and_head(tmp_path_factory):
    """A policy whose sampled text is predictable (its logits scaled up: the random one is
    near uniform at T = 1, where every head drafts ~1 token a step) and a head distilled on it."""
    policy = load_model(small_qwen2(tmp_path_factory.mktemp("sharp")))
    with torch.no_grad():
        policy.lm_head.weight.mul_(18.0)
    generator = torch.Generator().manual_seed(99)
    train = [torch.randint(0, 40, (4,), generator=generator) for _ in range(32)]
    return policy, greedy_distilled_head(policy, train, max_new_tokens=24, steps=120)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_expected_acceptance_predicts_what_the_engine_drafts(sharp_policy_and_head, temperature):
    """The teacher-forced estimate against tokens per step of the real engine, on the very
    rollouts it produced (64 rows, chain of 4): within 10% (it counts every root, the engine
    only those its steps land on; 3-7% over in trials). Scoring each draft at its root
    instead of j - 1 positions on (the chain unshifted) fails it: 2.57 against 2.11 greedy."""
    policy, head = sharp_policy_and_head
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 40, (4,), generator=generator) for _ in range(16)]
    engine = SpeculativeEngine(policy, EagleDrafter(policy, head), max_rows=64, max_len=64)
    torch.manual_seed(0)
    rows = engine.generate([prompts[i % 16] for i in range(64)], Sampling(temperature, max_new_tokens=24),
                           DraftShape.parse("s4_t1_n4"))
    measured = sum(len(r.tokens) - 1 for r in rows) / sum(r.steps for r in rows)
    rollouts = [seq(r.prompt.tolist() + r.tokens, start=len(r.prompt)) for r in rows]
    expected = expected_acceptance(policy, head, rollouts, 4, temperature, chunk=24)
    assert measured > 1.4  # a head worth measuring
    assert expected == pytest.approx(measured, rel=0.10)
    assert expected_acceptance(policy, head, [], 4, temperature) == 0.0
