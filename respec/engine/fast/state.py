"""The device-resident state of a batch that the fast path steps without the host.

Everything a decoding step reads or writes lives in tensors allocated once, at fixed
addresses, so a step can be captured as a CUDA graph and replayed: the target's and the
draft head's KV stores, each row's committed lengths, its root token (sampled, not yet
in the cache), the head's hidden state for that root, and the output buffers. Rows are
the first ``b`` entries of every tensor for a batch bucket of size b; a shrinking batch
is compacted to the front (``FastState.keep``) so a smaller bucket's graph can take over.
"""

from __future__ import annotations

import torch
from torch import Tensor

from respec.engine.config import ModelConfig


class StaticKV:
    """``store_and_read`` over a static store [layers, rows, kv_heads, max_len + 1, dim]:
    writes the new keys/values at `write_at` [B, T] (the spare last column absorbs writes
    that must land nowhere) and returns the whole store of rows 0..B-1. The attention mask
    decides what is visible, so no length is read on the host."""

    def __init__(self, k_store: Tensor, v_store: Tensor, write_at: Tensor) -> None:
        self.k_store, self.v_store, self.write_at = k_store, v_store, write_at

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        k_layer, v_layer = self.k_store[layer], self.v_store[layer]
        k_layer[rows, :, self.write_at] = k.transpose(1, 2).to(k_layer.dtype)
        v_layer[rows, :, self.write_at] = v.transpose(1, 2).to(v_layer.dtype)
        return k_layer[: k.shape[0]], v_layer[: k.shape[0]]


def visible_up_to(positions: Tensor, num_keys: int) -> Tensor:
    """bool [B, 1, T, S]: query i sees key s iff s <= positions[b, i] (a causal chain whose
    new entries were written at their own positions after the committed prefix)."""
    keys = torch.arange(num_keys, device=positions.device)
    return (keys <= positions[..., None])[:, None]


class FastState:
    """Static tensors for up to `rows` sequences of up to `max_len` cached positions."""

    def __init__(self, config: ModelConfig, rows: int, max_len: int, out_len: int, dtype: torch.dtype,
                 device: torch.device, head_layers: int = 0) -> None:
        kv_shape = (config.num_key_value_heads, max_len + 1, config.head_dim)
        self.max_len, self.rows = max_len, rows
        self.k = torch.zeros(config.num_hidden_layers, rows, *kv_shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.head_k = torch.zeros(head_layers, rows, *kv_shape, dtype=dtype, device=device)
        self.head_v = torch.zeros_like(self.head_k)
        long = dict(dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, **long)  # committed target positions
        self.head_lengths = torch.zeros(rows, **long)  # committed head positions
        self.root = torch.zeros(rows, **long)  # the last sampled token, not yet cached
        self.root_h = torch.zeros(rows, config.hidden_size, dtype=dtype, device=device)
        self.out = torch.zeros(rows, out_len + 1, **long)  # the last column absorbs padding
        self.out_logp = torch.zeros(rows, out_len + 1, dtype=torch.float32, device=device)
        self.out_count = torch.zeros(rows, **long)
        self.max_new = torch.ones(rows, **long)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.accepted = torch.zeros(rows, **long)  # draft tokens accepted, per row
        self.steps = torch.zeros(rows, **long)  # verification steps a live row took part in

    def tensors(self) -> dict[str, Tensor]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Tensor)}

    def reset(self) -> None:
        """Every row empty and done (a graph warm-up leaves garbage behind)."""
        for name, tensor in self.tensors().items():
            tensor.fill_(1 if name in ("done", "max_new") else 0)

    def keep(self, order: Tensor) -> None:
        """Reorder rows in place: row i becomes old row order[i] (compaction: the live rows
        first, so a smaller bucket's graph, which reads rows 0..b-1, carries on with them)."""
        for tensor in self.tensors().values():
            dim = 1 if tensor.dim() == 5 else 0  # KV stores are [layers, rows, ...]
            tensor.copy_(tensor.index_select(dim, order))
