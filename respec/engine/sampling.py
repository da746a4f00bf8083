"""From logits to the distribution a row samples from: temperature, top-k, top-p per row.

``target_probs`` is the one distribution both plain sampling and the speculative
acceptance rule use, so speculative decoding samples exactly what plain decoding would.
Parameters are per-row tensors [B] (rows of one batch may differ):

- temperature: 0 = greedy, a one-hot distribution at the argmax;
- top_k: keep the k most likely tokens, 0 = off;
- top_p: keep the smallest most-likely set whose mass reaches p, 1.0 = off.

They apply in that order (temperature, then top-k, then top-p), as in transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def validate(temperature: Tensor | float, top_k: Tensor | int, top_p: Tensor | float) -> None:
    """ValueError naming the first bad parameter and its value (scalars or per-row tensors)."""
    temperature, top_k, top_p = (torch.as_tensor(x) for x in (temperature, top_k, top_p))
    if top_k.is_floating_point() or top_k.dtype == torch.bool:
        raise ValueError(f"top_k must be an integer (0 = off), got {top_k.tolist()}")
    checks = (
        ("temperature", temperature, ~(temperature >= 0), ">= 0 (0 = greedy)"),
        ("top_k", top_k, top_k < 0, "an integer >= 0 (0 = off)"),
        ("top_p", top_p, ~((top_p > 0) & (top_p <= 1)), "in (0, 1] (1 = off)"),
    )
    for name, values, bad, rule in checks:
        if bool(bad.any()):
            value = values.flatten()[bad.flatten().nonzero()[0, 0]].item()
            raise ValueError(f"{name} must be {rule}, got {value}")


def target_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """float32 probabilities, same shape as logits ([B, V] or [B, T, V]); parameters [B]."""
    validate(temperature, top_k, top_p)
    logits = logits.float()
    shape = (-1,) + (1,) * (logits.dim() - 1)  # broadcast [B] over positions and vocab
    greedy = (temperature == 0).reshape(shape)
    scale = torch.where(temperature > 0, temperature, 1.0).float().reshape(shape)
    scaled = _truncate(logits / scale, top_k.reshape(shape), top_p.float().reshape(shape))
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, one_hot, probs)
    return probs


def _truncate(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (one sort serves both)."""
    if not bool((top_k > 0).any() or (top_p < 1).any()):
        return logits  # sorting a large vocabulary is the expensive part: skip when off
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k > 0) & (rank >= top_k)
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # the top token always stays (mass_before = 0)
    drop = (top_p < 1) & (mass_before >= top_p)
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """long [...]: one token drawn from each distribution of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator)
    return tokens.reshape(probs.shape[:-1])


def behaviour_logprobs(logits: Tensor, tokens: Tensor, temperature: Tensor) -> Tensor:
    """float32 log_softmax(logits / T)[token], T = 1 where the row is greedy (T = 0).

    This is the log-probability the RL trainer recomputes from the same weights for its
    importance ratio: untruncated (no top-k/top-p) and never a one-hot, whose 0 / -inf
    would make every ratio degenerate. logits [B, V] or [B, T, V]; tokens [B] or [B, T].
    """
    shape = (-1,) + (1,) * (logits.dim() - 1)
    scale = torch.where(temperature > 0, temperature, 1.0).float().reshape(shape)
    logp = torch.log_softmax(logits.float() / scale, dim=-1)
    return logp.gather(-1, tokens.long().clamp(min=0)[..., None]).squeeze(-1)
