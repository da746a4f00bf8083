"""KV cache bookkeeping: slots, lengths, tentative writes, commit of an accepted path."""

from __future__ import annotations

import pytest
import torch

from respec.engine.config import ModelConfig
from respec.engine.errors import CacheFullError, SequenceTooLongError
from respec.engine.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=16,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
)


def marked(values: list[float], layers: int = 2) -> torch.Tensor:
    """[1, kv_heads=1, T, head_dim=4] entries whose every element is the given value."""
    return torch.tensor(values)[None, None, :, None].expand(1, 1, len(values), 4).clone()


def write_all_layers(cache: KVCache, slot: int, values: list[float]) -> None:
    slots = torch.tensor([slot])
    positions = cache.write_positions(slots, len(values))
    for layer in range(CONFIG.num_hidden_layers):
        cache.write(layer, slots, positions, marked(values), -marked(values))


def stored(cache: KVCache, slot: int) -> list[float]:
    """The first element of each committed K entry of layer 1 (what `marked` wrote)."""
    return cache.k[1, slot, 0, : int(cache.lengths[slot]), 0].tolist()


def test_slots_are_allocated_lowest_first_freed_and_reused():
    cache = KVCache(CONFIG, num_slots=3, max_len=8)
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CacheFullError, match="all 3 KV cache slots are in use"):
        cache.allocate()
    write_all_layers(cache, 1, [1.0, 2.0])
    cache.advance(torch.tensor([1]), [2])
    cache.free(1)
    assert cache.num_free == 1 and cache.allocate() == 1
    assert int(cache.lengths[1]) == 0  # the new owner starts empty
    with pytest.raises(ValueError, match="slot 7 is not allocated"):
        cache.free(7)
    cache.free(2)
    with pytest.raises(ValueError, match="slot 2 is not allocated"):
        cache.free(2)


def test_shapes_dtype_and_device_are_as_given():
    cache = KVCache(CONFIG, num_slots=2, max_len=5, dtype=torch.bfloat16)
    assert cache.k.shape == cache.v.shape == (2, 2, 1, 5, 4)
    assert cache.k.dtype == torch.bfloat16 and cache.lengths.tolist() == [0, 0]


def test_commit_moves_the_accepted_entries_behind_the_prefix():
    cache = KVCache(CONFIG, num_slots=2, max_len=10)
    slot = cache.allocate()
    write_all_layers(cache, slot, [1.0, 2.0, 3.0])
    cache.advance(torch.tensor([slot]), [3])
    write_all_layers(cache, slot, [10.0, 11.0, 12.0, 13.0, 14.0])  # root + 4 tree nodes
    cache.commit(torch.tensor([slot]), [[0, 2, 4]])
    assert stored(cache, slot) == [1.0, 2.0, 3.0, 10.0, 12.0, 14.0]
    assert cache.v[0, slot, 0, :6, 0].tolist() == [-1.0, -2.0, -3.0, -10.0, -12.0, -14.0]


def test_commit_takes_lists_or_a_padded_table_alike():
    tables = [[[0, 3], [0, 1, 2]], torch.tensor([[0, 3, -1], [0, 1, 2]])]
    results = []
    for kept in tables:
        cache = KVCache(CONFIG, num_slots=2, max_len=6)
        slots = torch.tensor([cache.allocate(), cache.allocate()])
        for slot, base in zip(slots.tolist(), (0.0, 100.0), strict=True):
            write_all_layers(cache, slot, [base + i for i in range(4)])
        cache.commit(slots, kept)
        results.append([stored(cache, 0), stored(cache, 1)])
    assert results[0] == results[1] == [[0.0, 3.0], [100.0, 101.0, 102.0]]


def test_commit_refuses_what_the_last_pass_did_not_write():
    cache = KVCache(CONFIG, num_slots=1, max_len=8)
    slot = torch.tensor([cache.allocate()])
    write_all_layers(cache, 0, [1.0, 2.0])
    with pytest.raises(ValueError, match="index 2 but the last pass wrote 2 entries"):
        cache.commit(slot, [[0, 2]])
    with pytest.raises(ValueError, match="must ascend"):
        cache.commit(slot, [[1, 0]])
    with pytest.raises(ValueError, match="cannot keep 3 entries"):
        cache.advance(slot, [3])


def test_a_row_that_would_pass_max_len_is_refused_before_anything_is_written():
    cache = KVCache(CONFIG, num_slots=2, max_len=6)
    slots = torch.tensor([cache.allocate(), cache.allocate()])
    write_all_layers(cache, 0, [1.0, 2.0, 3.0, 4.0])
    cache.advance(slots[:1], [4])
    before = cache.k.clone()
    with pytest.raises(SequenceTooLongError, match=r"slot 0: 4 cached \+ 3 new tokens = 7 positions, .*max_len=6"):
        cache.check_room(slots, torch.tensor([3, 3]))
    assert torch.equal(cache.k, before) and cache.lengths.tolist() == [4, 0]
    assert issubclass(SequenceTooLongError, CacheFullError)


def test_padding_writes_past_the_end_land_in_the_spare_column():
    cache = KVCache(CONFIG, num_slots=1, max_len=4)
    slot = torch.tensor([cache.allocate()])
    write_all_layers(cache, 0, [1.0, 2.0])
    cache.advance(slot, [2])
    write_all_layers(cache, 0, [3.0, 4.0, 5.0, 6.0])  # 2 real tokens, 2 of padding past max_len
    cache.advance(slot, [2])
    assert stored(cache, 0) == [1.0, 2.0, 3.0, 4.0]
