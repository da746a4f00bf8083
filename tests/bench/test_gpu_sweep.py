"""bench/gpu.py's sweep: the long-tailed batches of --long-share (no GPU needed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu import long_tailed  # noqa: E402


def test_long_tailed_batches_take_the_share_from_the_longest_and_the_rest_from_the_shortest():
    prompts = [[0] * n for n in range(1, 101)]  # lengths 1..100
    batch = long_tailed(prompts, 200, 0.05)
    lengths = sorted(len(p) for p in batch)
    assert len(batch) == 200
    assert all(n >= 76 for n in lengths[-10:]) and all(n <= 50 for n in lengths[:-10])  # 10 long, 190 short
    assert all(len(p) <= 50 for p in long_tailed(prompts, 7, 0.0))
