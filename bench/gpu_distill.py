"""The RL section's online distillation of the EAGLE head (bench/gpu_rl.py): the head's
reward-weighted KL to the policy's distribution over the latest rollouts, from a view of
them (tokens, the hidden states at the head's layers, the logits) that either the GRPO
update's own forward pass kept (`captured_views`, GRPOTrainer.captured) or a pass of its
own computes (`target_views`)."""

from __future__ import annotations

import torch

from respec.engine.devices import bf16_autocast
from respec.engine.drafters.eagle import EagleHead, distill_loss
from respec.engine.model import CausalLM
from respec.engine.tokenizer import char_tokenizer
from respec.rl.distill import pad_right
from respec.rl.trainer import CapturedPass, TrainSample


def distill_rollouts(target: CausalLM, head: EagleHead, optimizer, samples: list[TrainSample], rewards: list[float],
                     batch: int = 128, unroll: int = 4, scale: float = 1.0, apply: bool = True) -> None:
    """One pass over `samples`, each weighted by its reward over their mean reward (the
    DraftDistiller's "reward" weighting, clipped to [0.1, 5]). The targets come from
    `target`: the trainer's own (newest) weights under autocast. The loss, times `scale`,
    adds to the head's gradients; `apply`: take the optimiser step (and clear them) after
    the pass, else keep accumulating for a later call."""
    scored = [TrainSample(s.prompt, s.response, s.behaviour_logprobs, r, s.group_id) for s, r in zip(samples, rewards,
                                                                                                  strict=True)]
    distill_views(head, optimizer, target_views(target, head, scored, batch), unroll, scale, apply)


def target_views(target: CausalLM, head: EagleHead, samples: list[TrainSample],
                 batch: int = 128) -> list[tuple[CapturedPass, torch.Tensor]]:
    """A pass of `target` (no gradients, autocast) over the samples, `batch` at a time: each
    batch's view (tokens, hidden states at the head's layers, logits) and its rewards."""
    device = next(target.parameters()).device
    sequences = [torch.cat([s.prompt, s.response]).tolist() for s in samples]
    views = []
    for start in range(0, len(sequences), batch):
        tokens, valid = pad_right(sequences[start:start + batch], char_tokenizer().pad_id or 0)
        tokens, valid = tokens.to(device), valid.to(device)
        with torch.no_grad(), bf16_autocast(device):
            output = target(tokens, capture_layers=head.capture_layers)
        rows = torch.arange(start, start + len(tokens), device=device)
        rewards = torch.tensor([s.reward for s in samples[start:start + batch]])
        views.append((CapturedPass(rows, tokens, valid, torch.cat(output.captured, dim=-1), output.logits), rewards))
    return views


def captured_views(passes: list[CapturedPass], samples: list[TrainSample],
                   first: int) -> list[tuple[CapturedPass, torch.Tensor]]:
    """The update's views (GRPOTrainer.captured) of samples[first:], with their rewards."""
    views = []
    for view in passes:
        keep = (view.rows >= first).nonzero().squeeze(1)
        if len(keep):
            rows = view.rows[keep]
            rewards = torch.tensor([samples[row].reward for row in rows.tolist()])
            views.append((CapturedPass(rows, view.tokens[keep], view.valid[keep], view.features[keep],
                                       view.logits[keep]), rewards))
    return views


def distill_views(head: EagleHead, optimizer, views: list[tuple[CapturedPass, torch.Tensor]], unroll: int = 4,
                  scale: float = 1.0, apply: bool = True) -> None:
    """The head's mean KL to the targets over every rollout in `views`, each weighted by its
    reward over the mean reward of all of them (clipped to [0.1, 5]). The loss, times
    `scale`, adds to the head's gradients (a view at a time, its mean weighted by its share
    of the rollouts); `apply`: then take the optimiser step and clear them, else keep
    accumulating for a later call."""
    rewards = torch.cat([r for _, r in views])
    mean, total = float(rewards.mean()), len(rewards)
    for view, view_rewards in views:
        device = view.tokens.device
        weights = (view_rewards / mean if mean > 0 else torch.ones_like(view_rewards)).clamp(0.1, 5.0)
        with bf16_autocast(device):
            loss = distill_loss(head, view.features.float(), view.tokens, view.logits.float(),
                                weights=weights.to(device), valid=view.valid, steps=unroll)
        (loss * scale * len(view_rewards) / total).backward()
    if apply:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
