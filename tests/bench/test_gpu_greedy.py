"""bench/gpu.py's check of where greedy SD and plain decoding part (no GPU needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu import divergence_margin  # noqa: E402

from respec.engine.checkpoint import load_model  # noqa: E402
from tests.checkpoints import small_qwen2  # noqa: E402


def test_the_margin_is_the_float32_logit_gap_of_the_two_chosen_tokens(tmp_path):
    model = load_model(small_qwen2(tmp_path / "m", vocab=8, layers=2, seed=3))
    prompt, plain, drafted = [1, 2, 3], [4, 5, 6, 7], [4, 5, 2, 2]
    margin = divergence_margin(model, prompt, plain, drafted)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + plain[:2]])).logits[0, -1]
    assert margin["at"] == 2
    assert abs(margin["gap"] - float(logits[6] - logits[2])) < 1e-3
    assert margin["top_gap"] >= 0 and margin["bf16_spacing"] > 0


def test_a_run_that_merely_ends_first_has_no_margin(tmp_path):
    model = load_model(small_qwen2(tmp_path / "m", vocab=8, layers=2, seed=3))
    assert divergence_margin(model, [1, 2], [4, 5, 6], [4, 5]) is None
