"""`respec bench adaptive`'s long tail: what it reports as the rows' lengths, and its options."""

from __future__ import annotations

import pytest
import torch

from respec.bench.adaptive import Adaptive, _summarise_tail, compare, run_benchmark
from respec.engine.checkpoint import load_model
from respec.engine.drafters.ngram import NgramDrafter
from respec.sched.cost_model import CostModel
from respec.sched.policy import SchedulerPolicy
from respec.sched.profile import Profile, ProfilePoint
from tests.checkpoints import small_qwen2


def test_an_unknown_tail_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match="natural"):
        run_benchmark("no/such/model", tail_kind="uniform")


def test_the_tails_lengths_are_what_the_rows_emitted(tmp_path):
    """With a stop token a row's length is its answer's, not its budget: the summary reads
    the emitted tokens (here the budgets, no stop token, so the two must agree)."""
    model = load_model(small_qwen2(tmp_path / "m", vocab=12, seed=1))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 12, (3,), generator=generator).repeat(2) for _ in range(6)]
    budgets = [3, 9, 4, 12, 5, 7]
    configs = ("s2_t1_n2",)
    points = [ProfilePoint(c, b, 16, 1e-3 * (1 + (c != "nosd"))) for c in ("nosd", *configs) for b in (1, 8)]
    policy = SchedulerPolicy(CostModel.build(configs, Profile({"device": "cpu"}, points, {configs[0]: 1.5})), configs)
    results = compare(model, NgramDrafter(), prompts, budgets, 4, (), configs, Adaptive(policy), 1, lambda: None)
    summary = _summarise_tail(results)
    assert results["nosd"]["lengths"] == budgets
    assert summary["lengths"] == {"median": 6, "p90": 10, "max": 12, "total": 40}
