"""From logits to the distribution a row samples from (temperature, top-k, top-p).

The speculative acceptance rule and plain sampling use the same processed distribution,
so SD samples exactly what plain decoding would. Greedy rows (temperature 0) get a one-hot
distribution at the argmax. Behaviour log-probabilities for RL are log_softmax(logits / T)
without top-k/top-p truncation (T = 1 for greedy rows): that is what the trainer
recomputes from the same weights, so the two agree when nothing is stale.
"""

from __future__ import annotations

import torch


def validate(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V]; per-row parameters [B] -> float32 probabilities [B, T, V]."""
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None, None]
    scaled = _top_k(scaled, top_k)
    scaled = _top_p(scaled, top_p)
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        probs = torch.where(greedy[:, None, None], one_hot, probs)
    return probs


def _top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    if not bool((top_k > 0).any()):
        return logits
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None, None].expand(-1, logits.shape[1], 1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    if not bool((top_p < 1).any()):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    # drop a token when the tokens before it already reach p (the top one always stays)
    drop = (cumulative - ordered.softmax(-1)) >= top_p[:, None, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def behaviour_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], tokens [B, T] -> log_softmax(logits / T)[token], T = 1 where greedy."""
    scale = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits.float() / scale[:, None, None], dim=-1)
    return logp.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
