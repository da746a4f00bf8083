"""Target features at positions already in the KV cache, recomputed without writing to it.

While the Scheduler runs plain decoding the target does not capture the drafter's
features (capturing them, gathering the kept positions and appending them to every row's
window cost 3-9% of a plain step on the CPU). When SD comes back on, a row's window has
a gap: the positions decoded meanwhile. This pass fills it: the committed tokens of the
gap (at most the drafter's window) run through the layers up to the highest captured
one, each attending to the cached keys/values at positions <= its own, which are exactly
the entries the original passes wrote. So the features equal what capturing would have
returned (up to float rounding of a different batch shape), and the cache is untouched:
plain decoding's committed entries, and with them the greedy tokens, stay as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor

from respec.engine.kv_cache import KVCache
from respec.engine.model import AttentionMask, CausalLM


class _ReadCommitted:
    """``store_and_read`` that stores nothing: the cache already holds these positions' keys."""

    def __init__(self, cache: KVCache, slots: Tensor, read_length: int) -> None:
        self.cache, self.read_length = cache, read_length
        self.rows = cache.rows_of(slots)

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.read_rows(layer, self.rows, self.read_length)


def committed_features(model: CausalLM, cache: KVCache, slots: Tensor, tokens: Tensor, positions: Tensor,
                       capture_layers: tuple[int, ...]) -> Tensor:
    """[B, T, len(capture_layers) * hidden]: the features of tokens [B, T] sitting at committed
    cache positions [B, T] of `slots` (every position < the slot's length; padding columns
    may repeat a real position, their features mean nothing)."""
    if not capture_layers:
        raise ValueError("committed_features needs capture_layers")
    if bool((positions >= cache.lengths[slots][:, None]).any()):
        raise ValueError("committed_features reads committed positions only")
    read_length = int(positions.max()) + 1
    mask = (torch.arange(read_length, device=cache.device) <= positions[..., None])[:, None]  # causal over the cache
    config = model.config
    x = model.embed(tokens)
    cos, sin = model.rotary.cos_sin(positions, x.dtype, read_length)
    prepared = AttentionMask(mask, config.num_attention_heads // config.num_key_value_heads, x.dtype)
    kv = _ReadCommitted(cache, slots, read_length)
    captured = {}
    for index, layer in enumerate(model.model.layers[: max(capture_layers) + 1]):  # later layers feed nothing
        x = layer(x, cos, sin, prepared, kv)
        captured[index] = x
    return torch.cat([captured[i] for i in capture_layers], dim=-1)
