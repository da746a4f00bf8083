"""GRPO advantages: each sample's reward against the other samples of its prompt."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def group_advantages(rewards: torch.Tensor, group_ids: Sequence[str], scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); a group of equal rewards gives 0.

    `scale_by_std=False` keeps the raw difference (Dr. GRPO's choice: no bias toward
    groups whose rewards barely differ).
    """
    if rewards.ndim != 1 or len(group_ids) != rewards.numel():
        raise ValueError(f"rewards {tuple(rewards.shape)} and {len(group_ids)} group ids must match")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(group_ids):
        members[group].append(index)
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for indices in members.values():
        group = rewards[indices].float()
        centred = group - group.mean()
        if scale_by_std and len(indices) > 1:
            centred = centred / (group.std(unbiased=False) + eps)
        advantages[indices] = centred
    return advantages
