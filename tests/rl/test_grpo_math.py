from __future__ import annotations

import pytest
import torch

from respec.rl.advantages import group_advantages
from respec.rl.loss import PPOConfig, ppo_loss


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 5.0, 5.0, 0.0, 2.0])
    groups = ["a", "a", "a", "a", "b", "b", "c", "c"]
    advantages = group_advantages(rewards, groups)
    assert advantages[:4].mean().abs() < 1e-6 and (advantages[:4].std(unbiased=False) - 1).abs() < 1e-4
    assert torch.equal(advantages[4:6], torch.zeros(2))  # equal rewards: no signal
    assert advantages[6] < 0 < advantages[7]
    raw = group_advantages(rewards, groups, scale_by_std=False)
    assert torch.allclose(raw[6:], torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="must match"):
        group_advantages(rewards, groups[:3])


def sequences(seed=0, batch=4, length=6):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, length, generator=generator) - 2
    return base, torch.ones(batch, length, dtype=torch.bool)


def test_on_policy_gradient_raises_positive_advantage_tokens():
    base, mask = sequences()
    logprobs = base.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0])
    loss, stats = ppo_loss(logprobs, base, base, advantages, mask)
    loss.backward()
    grad = logprobs.grad
    assert (grad[0] < 0).all() and (grad[1] > 0).all() and (grad[3] == 0).all()  # descent raises row 0
    assert stats["behaviour_weight_mean"] == pytest.approx(1.0) and stats["clip_fraction"] == 0.0


def test_clipping_stops_the_gradient_outside_the_trust_region():
    base, mask = sequences()
    moved = (base + 0.5).requires_grad_(True)  # ratio e^0.5 > 1.2
    loss, stats = ppo_loss(moved, base, base, torch.ones(4), mask, PPOConfig(clip_eps=0.2))
    loss.backward()
    assert torch.count_nonzero(moved.grad) == 0 and stats["clip_fraction"] == 1.0


def test_stale_tokens_are_reweighted_by_proximal_over_behaviour_and_capped():
    base, mask = sequences()
    logprobs = base.clone().requires_grad_(True)
    stale = base - 1.0  # the behaviour policy gave these tokens less probability
    loss_stale, stats = ppo_loss(logprobs, base, stale, torch.ones(4), mask)
    assert stats["behaviour_weight_mean"] == pytest.approx(torch.e, rel=1e-5)
    loss_fresh, _ = ppo_loss(logprobs, base, base, torch.ones(4), mask)
    assert loss_stale.item() == pytest.approx(torch.e * loss_fresh.item(), rel=1e-5)
    _, capped = ppo_loss(logprobs, base, base - 10, torch.ones(4), mask, PPOConfig(behaviour_weight_cap=5.0))
    assert capped["behaviour_weight_mean"] == pytest.approx(5.0)


def test_mask_excludes_padding_and_kl_penalty():
    base, mask = sequences()
    mask[:, 3:] = False
    logprobs = base.clone().requires_grad_(True)
    loss, stats = ppo_loss(logprobs, base, base, torch.ones(4), mask, PPOConfig(kl_coef=0.1), reference_logprobs=base)
    loss.backward()
    assert torch.count_nonzero(logprobs.grad[:, 3:]) == 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)
    _, drifted = ppo_loss(logprobs, base, base, torch.ones(4), mask, PPOConfig(kl_coef=0.1),
                          reference_logprobs=base - 0.3)
    assert drifted["kl"] > 0
