"""A static KV cache: preallocated once, one slot per row, each row at its own length.

Rows of one batch sit at different positions (`lengths[slot]`). A verification pass
writes its T tentative entries right after a row's committed prefix; `commit` keeps the
accepted ones (moved to be contiguous: a tree's accepted path is not) and advances the
row. A finished row frees its slot for the next prompt (continuous batching).
"""

from __future__ import annotations

import torch

from respec.engine.config import ModelConfig
from respec.engine.errors import CacheFullError


class KVCache:
    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype=torch.float32,
                 device: str | torch.device = "cpu") -> None:
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self._free = list(range(slots - 1, -1, -1))

    @property
    def slots(self) -> int:
        return self.lengths.numel()

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.slots} cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    def check_room(self, slots: torch.Tensor, new_tokens: int) -> None:
        need = self.lengths[slots] + new_tokens
        if bool((need > self.max_len).any()):
            worst = int(need.max())
            raise CacheFullError(f"a row needs {worst} cache positions; the cache holds {self.max_len}")

    def commit(self, slots: torch.Tensor, kept: list[torch.Tensor]) -> None:
        """Keep, per row, the verification entries at block offsets `kept[b]` (ascending)."""
        for row, slot in enumerate(slots.tolist()):
            offsets = kept[row]
            start = int(self.lengths[slot])
            count = offsets.numel()
            contiguous = bool((offsets == torch.arange(count, device=offsets.device)).all())
            if not contiguous:  # a tree's accepted path: move it to follow the prefix
                source = start + offsets.to(self.k.device)
                self.k[:, slot, :, start : start + count] = self.k[:, slot, :, source]
                self.v[:, slot, :, start : start + count] = self.v[:, slot, :, source]
            self.lengths[slot] = start + count
