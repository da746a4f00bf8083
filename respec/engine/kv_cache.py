"""A static KV cache: allocated once, one slot per sequence, each slot at its own length.

Layout: ``k`` and ``v`` are [layers, slots, kv_heads, max_len, head_dim]; ``lengths[slot]``
counts the committed entries of a slot. A forward pass writes its T new entries
*tentatively* at ``lengths .. lengths + T - 1`` (``write``) and ``commit`` then decides
what stays:

- prefill, decode, a chain: keep the first m entries, i.e. advance the length by m;
- a draft tree: keep the root and the accepted path, which need not be contiguous
  (node 4 may follow node 1); their entries are moved to follow the prefix. RoPE was
  applied at each node's depth, which equals its index on the accepted path, so the
  moved keys are already at the right positions.

Committed entries are never written by a forward pass, so a rejected draft cannot
corrupt the prefix. Slots are handed out by ``allocate`` and returned by ``free``: a
finished sequence frees its slot for the next prompt (continuous batching).

One spare column past ``max_len`` absorbs writes that must land nowhere (padding tokens
beyond the end, padded ``commit`` entries), so every write has the same static shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from respec.engine.config import ModelConfig
from respec.engine.errors import CacheFullError, SequenceTooLongError

KeptIndices = Tensor | Sequence[Tensor | Sequence[int]]


class KVCache:
    """Preallocated K/V tensors with per-slot lengths (see the module docstring)."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_len + 1, config.head_dim)
        self._k_store = torch.zeros(shape, dtype=dtype, device=device)
        self._v_store = torch.zeros(shape, dtype=dtype, device=device)
        self.k = self._k_store[..., :max_len, :]  # the public view, without the spare column
        self.v = self._v_store[..., :max_len, :]
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self._pending = [0] * num_slots  # tentative entries written since the last commit
        self._free = list(range(num_slots))

    # ------------------------------------------------------------------ slots

    @property
    def num_slots(self) -> int:
        return self.lengths.numel()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def dtype(self) -> torch.dtype:
        return self._k_store.dtype

    def allocate(self) -> int:
        """A free slot id (the lowest), emptied; CacheFullError when every slot is in use."""
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} KV cache slots are in use; free one first")
        slot = min(self._free)
        self._free.remove(slot)
        self._reset(slot)
        return slot

    def free(self, slot: int) -> None:
        """Return a slot; its entries are dropped (the next owner starts at length 0)."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated (the cache has {self.num_slots} slots)")
        self._reset(slot)
        self._free.append(slot)

    def _reset(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._pending[slot] = 0

    # ------------------------------------------------------------------ tentative writes

    def check_room(self, slots: Tensor, num_new: Tensor | int) -> None:
        """SequenceTooLongError, before anything is written, if a row would pass max_len."""
        need = self.lengths[slots] + torch.as_tensor(num_new, device=self.device)
        if bool((need > self.max_len).any()):
            row = int((need > self.max_len).nonzero()[0, 0])
            slot, length = int(slots[row]), int(self.lengths[slots[row]])
            raise SequenceTooLongError(
                f"slot {slot}: {length} cached + {int(need[row]) - length} new tokens = "
                f"{int(need[row])} positions, but the KV cache holds max_len={self.max_len}"
            )

    def write_positions(self, slots: Tensor, num_tokens: int, lengths: Tensor | None = None) -> Tensor:
        """long [B, T]: where each new entry goes; anything past max_len goes to the spare
        column. Records the T tentative entries per slot for ``commit`` to check.
        `lengths`: ``self.lengths[slots]`` when the caller has it already."""
        for slot in slots.tolist():
            self._pending[slot] = num_tokens
        lengths = self.lengths[slots] if lengths is None else lengths
        offsets = torch.arange(num_tokens, device=self.device)
        return (lengths[:, None] + offsets).clamp(max=self.max_len)

    def write(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store new entries. k, v: [B, kv_heads, T, head_dim]; positions: [B, T]."""
        rows = slots[:, None]
        self._k_store[layer][rows, :, positions] = k.transpose(1, 2).to(self.dtype)
        self._v_store[layer][rows, :, positions] = v.transpose(1, 2).to(self.dtype)

    def span_of(self, slots: Tensor, positions: Tensor) -> tuple[int, int] | None:
        """(slot, first position) when one row's entries go to consecutive positions (every
        decode, verification and single prefill), for ``write_span``; else None."""
        if positions.shape[0] != 1 or positions.shape[1] == 0:
            return None
        first = int(positions[0, 0])
        return (int(slots[0]), first) if first + positions.shape[1] <= self.max_len + 1 else None

    def write_span(self, layer: int, slot: int, first: int, k: Tensor, v: Tensor) -> None:
        """``write`` for one row at positions first, first + 1, ...: a slice copy, which
        costs a few small ops where the indexed write costs a dozen."""
        end = first + k.shape[2]
        self._k_store[layer, slot, :, first:end] = k[0]
        self._v_store[layer, slot, :, first:end] = v[0]

    def rows_of(self, slots: Tensor) -> slice | Tensor:
        """What ``read_rows`` takes: consecutive slots as a slice (a view, no copy), else the ids."""
        first = int(slots[0]) if slots.numel() else 0
        if torch.equal(slots, torch.arange(first, first + slots.numel(), device=slots.device)):
            return slice(first, first + slots.numel())
        return slots

    def read(self, layer: int, slots: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """K and V of the first `length` positions of each slot: [B, kv_heads, length, head_dim]."""
        return self.read_rows(layer, self.rows_of(slots), length)

    def read_rows(self, layer: int, rows: slice | Tensor, length: int) -> tuple[Tensor, Tensor]:
        """``read`` with the rows already worked out by ``rows_of`` (once per pass, not per layer)."""
        if isinstance(rows, slice):
            return self._k_store[layer, rows, :, :length], self._v_store[layer, rows, :, :length]
        return self._k_store[layer][rows, :, :length], self._v_store[layer][rows, :, :length]

    # ------------------------------------------------------------------ commit

    def advance(self, slots: Tensor, counts: Tensor | Sequence[int]) -> None:
        """Keep the first counts[b] tentative entries of each row (prefill, decode, chains)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        counts = torch.as_tensor(counts, dtype=torch.long, device=self.device)
        self._advance(slots, slots.tolist(), counts, counts.tolist())

    def _advance(self, slots: Tensor, slot_list: list[int], counts: Tensor, count_list: list[int]) -> None:
        for slot, count in zip(slot_list, count_list, strict=True):
            if not 0 <= count <= self._pending[slot]:
                raise ValueError(
                    f"slot {slot}: cannot keep {count} entries, the last pass wrote {self._pending[slot]}"
                )
            self._pending[slot] = 0
        self.lengths[slots] += counts

    def commit(self, slots: Tensor, kept: KeptIndices) -> None:
        """Keep, per row, the tentative entries at offsets ``kept[b]`` (ascending, from the
        start of the last pass), moved to follow the prefix; drop the rest.

        kept: a list of per-row index sequences, or a long tensor [B, K] padded with -1
        (e.g. ``Acceptance.source_positions()``: the root and the accepted nodes).
        """
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        kept = _padded(kept, len(slots), self.device)
        # One read of the indices to the host serves the checks, the counts and whether any
        # entry moves (a verification step at batch 1 pays per tensor op).
        slot_list, kept_lists = slots.tolist(), kept.tolist()
        count_list = self._check_kept(slot_list, kept_lists)
        if any(indices[:count] != list(range(count)) for indices, count in zip(kept_lists, count_list, strict=True)):
            self._move(slots, kept)
        counts = torch.tensor(count_list, dtype=torch.long, device=self.device)
        self._advance(slots, slot_list, counts, count_list)

    def _move(self, slots: Tensor, kept: Tensor) -> None:
        """Copy each kept entry to length + its rank; padding goes to the spare column."""
        start = self.lengths[slots][:, None]
        source = start + kept.clamp(min=0)
        rank = torch.arange(kept.shape[1], device=self.device)
        target = torch.where(kept >= 0, start + rank, self.max_len)
        rows = slots[:, None]
        for store in (self._k_store, self._v_store):
            entries = store[:, rows, :, source]  # a copy, so overlapping moves are safe
            store[:, rows, :, target] = entries

    def _check_kept(self, slots: list[int], kept: list[list[int]]) -> list[int]:
        """Entries kept per row; ValueError for anything but an ascending prefix."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"commit: slots repeat: {slots}")
        counts = []
        for row, (slot, indices) in enumerate(zip(slots, kept, strict=True)):
            valid = [i for i in indices if i >= 0]
            if indices[: len(valid)] != valid or any(b <= a for a, b in zip(valid, valid[1:], strict=False)):
                raise ValueError(f"commit row {row} (slot {slot}): kept indices must ascend, got {indices}")
            if valid and valid[-1] >= self._pending[slot]:
                raise ValueError(
                    f"commit row {row} (slot {slot}): index {valid[-1]} but the last pass "
                    f"wrote {self._pending[slot]} entries"
                )
            counts.append(len(valid))
        return counts


def _padded(kept: KeptIndices, rows: int, device: torch.device) -> Tensor:
    """Per-row index lists as one long tensor [B, K], padded with -1."""
    if isinstance(kept, Tensor):
        table = kept.to(device=device, dtype=torch.long)
        if table.dim() != 2 or table.shape[0] != rows:
            raise ValueError(f"commit: kept must be [{rows}, K], got {tuple(table.shape)}")
        return table
    lists = [torch.as_tensor(k, dtype=torch.long).flatten().tolist() for k in kept]
    if len(lists) != rows:
        raise ValueError(f"commit: {len(lists)} kept lists for {rows} slots")
    width = max((len(k) for k in lists), default=0)
    table = [k + [-1] * (width - len(k)) for k in lists]
    return torch.tensor(table, dtype=torch.long, device=device).reshape(rows, width)
