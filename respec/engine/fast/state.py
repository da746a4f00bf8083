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
    """Keys/values in a static store [layers, rows, kv_heads, max_len + 1, dim]: a pass
    writes its new entries at `write_at` [b, T] (the spare last column absorbs writes that
    must land nowhere) and attends over the whole store of rows 0..b-1; the attention mask
    decides what is visible, so no length is ever read on the host."""

    def __init__(self, k_store: Tensor, v_store: Tensor, write_at: Tensor) -> None:
        self.k_store, self.v_store, self.write_at = k_store, v_store, write_at
        self.keys = k_store.shape[3]  # positions a row can attend over: max_len + 1
        self.rows: Tensor | None = None  # the store rows' indices, made on the first write

    def write_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [b, T, kv_heads, dim] -> the rows' keys and values [b, kv_heads, S, dim]."""
        k_layer, v_layer = self.k_store[layer], self.v_store[layer]
        if self.rows is None:  # once per pass, and only on the PyTorch layers' passes (the kernels write their own)
            self.rows = torch.arange(self.write_at.shape[0], device=self.write_at.device)[:, None]
        k_layer[self.rows, :, self.write_at] = k.to(k_layer.dtype)
        v_layer[self.rows, :, self.write_at] = v.to(v_layer.dtype)
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
        self.prompt = torch.zeros(rows, max_len, **long)  # prefill's input, right-padded
        self.prompt_length = torch.ones(rows, **long)
        self.prompt_live = torch.zeros(rows, dtype=torch.bool, device=device)  # False: a padding row

    def load_prompts(self, prompts, b: int) -> None:
        """Prompts into the prompt buffer (one copy to the device); rows len(prompts)..b-1
        become one-token padding rows that start done."""
        n = len(prompts)
        host = torch.zeros(b, self.prompt.shape[1], dtype=torch.long)
        lengths = torch.ones(b, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
            host[row, : len(prompt)], lengths[row] = prompt, len(prompt)
        self.prompt[:b] = host.to(self.prompt.device, non_blocking=True)
        self.prompt_length[:b] = lengths.to(self.prompt.device, non_blocking=True)
        self.prompt_live[:b] = torch.arange(b) < n

    def tensors(self) -> dict[str, Tensor]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Tensor)}

    def reset(self) -> None:
        """Every row empty and done (a graph warm-up leaves garbage behind)."""
        for name, tensor in self.tensors().items():
            tensor.fill_(1 if name in ("done", "max_new", "prompt_length") else 0)

    def keep(self, order: Tensor, live: int) -> None:
        """Reorder rows in place: row i becomes old row order[i] (compaction: the live rows
        first, so a smaller bucket's graph, which reads rows 0..b-1, carries on with them).
        The KV stores [layers, rows, ...] move only their first `live` rows of order (the
        rest are done rows, whose keys and values nothing reads for a result again), a layer
        at a time: the scratch is one layer's live rows, where a whole store's copy took
        6.6 GiB at 4096 rows and ran an H100 out of memory."""
        for tensor in self.tensors().values():
            if tensor.dim() != 5:
                tensor.copy_(tensor.index_select(0, order))
                continue
            for layer in tensor:
                layer[:live] = layer.index_select(0, order[:live])
