"""bench/gpu_train.py's length-bucketed SFT batches (no GPU needed)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_train import length_bucketed  # noqa: E402


def test_bucketed_batches_cover_every_example_once_with_little_padding():
    source = random.Random(1)
    drawn = []

    def example():
        ids = list(range(source.randint(20, 300)))
        drawn.append(len(ids))
        return ids, 5

    batches = length_bucketed(example, batch=8, rng=random.Random(0), pool_batches=16)
    first_pool = [next(batches) for _ in range(16)]
    assert all(len(b) == 8 for b in first_pool)
    assert sorted(len(ids) for b in first_pool for ids, _ in b) == sorted(drawn)  # each drawn example once
    padded = sum(8 * max(len(ids) for ids, _ in b) for b in first_pool)
    assert 1 - sum(drawn) / padded < 0.1  # random batches of 20-300 tokens: ~40% padding
    assert [max(len(i) for i, _ in b) for b in first_pool] != sorted(max(len(i) for i, _ in b) for b in first_pool)
