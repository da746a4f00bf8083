"""What every backend checks of a prompt before it admits it: the ids and the budget.

The Verifier and the vLLM backend (respec/actors/vllm_rollouts.py) refuse the same bad
input with the same messages, so a bad prompt becomes the same "error" Rollout whichever
backend generates."""

from __future__ import annotations

import numpy as np

from respec.engine.errors import CacheFullError
from respec.engine.sampling import validate


def check_prompt_tokens(tokens: object, max_new_tokens: int, vocab: int) -> None:
    """ValueError naming what is wrong with a prompt's ids or its token budget."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"prompt tokens must be a 1-D array of integer ids, got {tokens.dtype} {tokens.shape}")
    if len(tokens) == 0:
        raise ValueError("empty prompt: a row needs at least one token")
    outside = np.flatnonzero((tokens < 0) | (tokens >= vocab))
    if len(outside):
        raise ValueError(f"prompt token {int(tokens[outside[0]])} at position {int(outside[0])} "
                         f"is outside the model's vocabulary [0, {vocab})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_fits(prompt_len: int, sampling, max_len: int, reserve: int = 0) -> None:
    """Sampling parameters valid and prompt + new tokens (+ reserve) within max_len."""
    validate(sampling.temperature, sampling.top_k, sampling.top_p)
    need = prompt_len + sampling.max_new_tokens + reserve + 1
    if prompt_len == 0 or need > max_len:
        raise CacheFullError(f"a prompt of {prompt_len} tokens with max_new_tokens={sampling.max_new_tokens} "
                             f"needs {need} positions; the cache holds {max_len}")
