"""The decoupled PPO objective (AReaL), which keeps training exact when rollouts are stale.

Three policies meet in an asynchronous loop: the *behaviour* policy that generated each
token (its log-probability is recorded at generation time, version by version), the
*proximal* policy (the weights at the start of this update, recomputed) and the current
weights being trained. The clipped ratio is taken against the proximal policy, so the
trust region is around where training is; the importance weight proximal / behaviour
corrects for the tokens having come from older versions. When rollouts are fresh the
weight is 1 and this is plain PPO-clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PPOConfig:
    clip_eps: float = 0.2
    behaviour_weight_cap: float = 5.0  # cap of proximal/behaviour (bounds the variance of stale tokens)
    kl_coef: float = 0.0  # > 0: penalise k3-KL to a reference policy


def ppo_loss(logprobs: torch.Tensor, proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
             advantages: torch.Tensor, mask: torch.Tensor, config: PPOConfig = PPOConfig(),
             reference_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean loss over the masked response tokens, and statistics for the metrics.

    logprobs: [B, T] under the weights being trained (with grad); proximal / behaviour /
    reference: [B, T] without grad; advantages: [B] (one per sequence); mask: [B, T] bool.
    """
    mask = mask.float()
    tokens = mask.sum().clamp(min=1.0)
    ratio = torch.exp(logprobs - proximal_logprobs)
    behaviour_weight = torch.exp(proximal_logprobs - behaviour_logprobs).clamp(max=config.behaviour_weight_cap)
    advantage = advantages[:, None].float()
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps) * advantage
    per_token = -behaviour_weight * torch.minimum(unclipped, clipped)
    loss = (per_token * mask).sum() / tokens
    stats = {
        "clip_fraction": float(((unclipped != clipped).float() * mask).sum() / tokens),
        "behaviour_weight_mean": float((behaviour_weight * mask).sum() / tokens),
        "ratio_mean": float((ratio.detach() * mask).sum() / tokens),
    }
    if config.kl_coef > 0 and reference_logprobs is not None:
        kl = _k3_kl(logprobs, reference_logprobs)
        kl_mean = (kl * mask).sum() / tokens
        loss = loss + config.kl_coef * kl_mean
        stats["kl"] = float(kl_mean.detach())
    return loss, stats


def _k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Unbiased, always >= 0 estimate of KL(current || reference) from sampled tokens."""
    log_ratio = reference_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1
