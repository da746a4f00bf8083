"""Supervised warm-up: teach a policy the task's answer format from worked solutions, so
RL starts from a model that sometimes succeeds rather than from zero.

Each example is `<bos> prompt solution <eos>`; the loss covers the solution and `<eos>`
only (the prompt is given, not learned). Problems are drawn fresh every step from the
task's generator with a seeded rng, so a run is reproducible and never repeats a batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from respec.engine.model import CausalLM
from respec.engine.tokenizer import TextTokenizer
from respec.tasks.base import Task


def encode_example(tokenizer: TextTokenizer, prompt: str, solution: str) -> tuple[list[int], int]:
    """Token ids of one example and the index where the learned part (the solution) starts."""
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    return prompt_ids + tokenizer.encode(solution) + [tokenizer.eos_id], len(prompt_ids)


def batch_tensors(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, L] and a mask [B, L-1] of the target positions to learn."""
    length = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length - 1, dtype=torch.bool)
    for row, (ids, start) in enumerate(examples):
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, start - 1 : len(ids) - 1] = True  # logits at i predict token i + 1
    return tokens, mask


def sft_loss(model: CausalLM, tokens: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    logits = model(tokens).logits[:, :-1]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="none",
                             label_smoothing=label_smoothing)
    return (losses * mask.reshape(-1)).sum() / mask.sum()


def train_sft(model: CausalLM, tokenizer: TextTokenizer, task: Task, steps: int, batch_size: int = 32,
              lr: float = 2e-3, seed: int = 0, on_step: Callable[[int, float], None] | None = None,
              label_smoothing: float = 0.0) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step.

    `label_smoothing` spreads that much of each target's probability over the vocabulary:
    the policy's modes come out better but its T = 1 samples worse (docs/RL.md)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    model.train()
    for step in range(steps):
        problems = [task.sample(rng) for _ in range(batch_size)]
        tokens, mask = batch_tensors([encode_example(tokenizer, p.prompt, p.solution) for p in problems],
                                     tokenizer.pad_id)
        loss = sft_loss(model, tokens, mask, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
