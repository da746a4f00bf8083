"""An EAGLE head that drafts something a test can see accepted: a random head is almost
never accepted by a random target, so tests distil one briefly on the target's own
greedy continuations (the way `respec prepare` trains the real one)."""

from __future__ import annotations

from pathlib import Path

import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import EagleHead, distill_loss
from respec.engine.model import CausalLM
from respec.engine.speculative import Sampling, SpeculativeEngine


def greedy_distilled_head(target: CausalLM, prompts: list[torch.Tensor], max_new_tokens: int,
                          steps: int) -> EagleHead:
    """A head (seed 0) distilled for `steps` full-batch steps on the target's greedy
    continuations of `prompts` (equal lengths, so the sequences stack without padding)."""
    rows = SpeculativeEngine(target, None, max_rows=len(prompts), max_len=64).generate(
        prompts, Sampling(temperature=0.0, max_new_tokens=max_new_tokens))
    sequences = torch.stack([torch.cat([r.prompt, torch.tensor(r.tokens)]) for r in rows])
    torch.manual_seed(0)
    head = EagleHead.for_target(target)
    with torch.no_grad():
        output = target(sequences, capture_layers=head.capture_layers)
    features = torch.cat(output.captured, dim=-1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = distill_loss(head, features, sequences, output.logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def saved_distilled_head(checkpoint: Path, directory: Path) -> Path:
    """A head distilled (120 steps) on the greedy continuations of 32 random 4-token prompts
    by the checkpoint's model, saved in `directory`: what the actor tests draft with."""
    target = load_model(checkpoint)
    generator = torch.Generator().manual_seed(99)
    train = [torch.randint(0, 40, (4,), generator=generator) for _ in range(32)]
    return greedy_distilled_head(target, train, max_new_tokens=24, steps=120).save(directory)
