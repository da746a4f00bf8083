"""Cost model: fit and prediction on synthetic timings, the prior, the online refresh, and
acceptance estimates."""

from __future__ import annotations

import math

import pytest

from respec.sched.cost_model import (
    AcceptanceEstimate,
    CostModel,
    OnlineCorrection,
    PriorCost,
    ProfileCost,
    geometric_accept_len,
)
from respec.sched.profile import Profile, ProfilePoint

BATCHES, CONTEXTS = (1, 2, 4, 8, 16, 32, 64), (16, 128)


def synthetic_time(config: str, batch: float, context: float) -> float:
    """A memory-bound floor, then linear in tokens verified; SD costs drafting on top."""
    tokens = {"nosd": 1, "s2_t1_n2": 3, "s4_t1_n4": 5}[config]
    draft = {"nosd": 0.0, "s2_t1_n2": 0.4e-3, "s4_t1_n4": 0.8e-3}[config]
    return 2e-3 + max(batch * tokens - 8, 0) * 0.1e-3 + batch * context * 1e-6 + draft


def synthetic_profile(scale: float = 1.0, accept: dict | None = None) -> Profile:
    points = [ProfilePoint(c, b, ctx, scale * synthetic_time(c, b, ctx))
              for c in ("nosd", "s2_t1_n2", "s4_t1_n4") for b in BATCHES for ctx in CONTEXTS]
    return Profile({"device": "test"}, points, accept or {"s2_t1_n2": 2.5, "s4_t1_n4": 3.5})


def test_profile_cost_reproduces_grid_points_and_interpolates_between_them():
    cost = ProfileCost.from_profile(synthetic_profile())
    for config in ("nosd", "s4_t1_n4"):
        for batch in BATCHES:
            assert cost.predict(config, batch, 16) == pytest.approx(synthetic_time(config, batch, 16))
        # between grid points: within 10% of the truth (log-log in batch, linear in context)
        for batch, context in ((3, 16), (12, 70), (48, 100)):
            assert cost.predict(config, batch, context) == pytest.approx(synthetic_time(config, batch, context), rel=0.1)
    # past the grid: linear in batch and context (the synthetic truth is linear there)
    assert cost.predict("nosd", 128, 16) == pytest.approx(synthetic_time("nosd", 128, 16), rel=0.02)
    assert cost.predict("nosd", 8, 256) == pytest.approx(synthetic_time("nosd", 8, 256), rel=0.02)
    assert cost.predict("nosd", 0.5, 4) == pytest.approx(synthetic_time("nosd", 1, 16))  # held below the grid


def test_tokens_per_s_prefers_sd_at_small_batch_and_plain_decoding_at_large():
    model = CostModel.build(["s2_t1_n2", "s4_t1_n4"], synthetic_profile())
    small = {c: model.tokens_per_s(c, 1, 16) for c in ("nosd", "s2_t1_n2", "s4_t1_n4")}
    large = {c: model.tokens_per_s(c, 64, 16) for c in small}
    assert max(small, key=small.get) == "s4_t1_n4"
    assert max(large, key=large.get) == "nosd"
    assert small["nosd"] == pytest.approx(1 / synthetic_time("nosd", 1, 16))
    assert small["s4_t1_n4"] == pytest.approx(3.5 / synthetic_time("s4_t1_n4", 1, 16))


def test_profile_without_a_candidate_is_refused_by_name():
    with pytest.raises(ValueError, match="no timings for s6_t1_n6"):
        CostModel.build(["s2_t1_n2", "s6_t1_n6"], synthetic_profile())


def test_a_foreign_profile_converges_to_the_live_timings():
    """A profile from a 3x faster device: live steps pull every config's prediction to the
    truth, including configs not running (a uniform error carries over)."""
    model = CostModel.build(["s2_t1_n2", "s4_t1_n4"], synthetic_profile(scale=1 / 3))
    for _ in range(30):
        for batch in (4, 8):
            model.observe("nosd", batch, 16, synthetic_time("nosd", batch, 16), 1.0)
    assert model.step_time("nosd", 8, 16) == pytest.approx(synthetic_time("nosd", 8, 16), rel=0.02)
    assert model.step_time("s4_t1_n4", 8, 16) == pytest.approx(synthetic_time("s4_t1_n4", 8, 16), rel=0.05)


def test_online_correction_is_specific_to_the_batch_octave_when_seen():
    correction = OnlineCorrection(weight=0.5)
    for _ in range(20):
        correction.observe("nosd", 64, observed_s=2.0, predicted_s=1.0)
        correction.observe("nosd", 1, observed_s=1.0, predicted_s=1.0)
    assert correction.factor("nosd", 64) == pytest.approx(2.0, rel=1e-3)
    assert correction.factor("nosd", 1) == pytest.approx(1.0)
    assert 1.0 < correction.factor("nosd", 16) < 2.0  # an octave not seen: the config's own EMA
    assert correction.factor("s2_t1_n2", 64) == pytest.approx(2.0, rel=1e-3)  # not run: what ran at this octave
    assert correction.factor("s2_t1_n2", 16) == pytest.approx(correction.factor("nosd", 16))  # ... else overall
    before = correction.factor("s2_t1_n2", 8)
    correction.observe("s2_t1_n2", 8, observed_s=10.0, predicted_s=1.0)
    # its own now: starts from what was believed, the 10x outlier clipped to 2x (log 0.7); the
    # seed is not an observation at this level, so the first step counts fully
    assert correction.factor("s2_t1_n2", 8) == pytest.approx(before * math.exp(0.7))
    assert correction.count("s2_t1_n2", 8) == 1 and correction.count("s2_t1_n2", 16) == 0
    correction.observe("s2_t1_n2", 8, observed_s=before, predicted_s=1.0)
    assert correction.factor("s2_t1_n2", 8) == pytest.approx(before * math.exp(0.35))  # a mean of the two


def test_acceptance_live_where_measured_and_drifted_prior_elsewhere():
    acceptance = AcceptanceEstimate({"s2_t1_n2": 2.5, "s4_t1_n4": 3.5}, weight=1.0, stale_after=3)
    assert acceptance.estimate("s4_t1_n4") == 3.5 and acceptance.estimate("nosd") == 1.0
    acceptance.observe("s2_t1_n2", 1.75)  # half the prior's accepted drafts: the drafter went stale
    assert acceptance.estimate("s2_t1_n2") == pytest.approx(1.75)  # weight 1: the live value
    assert acceptance.estimate("s4_t1_n4") == pytest.approx(1 + 2.5 * 0.5)
    acceptance.observe("nosd", 1.0)  # plain steps carry no acceptance information
    assert acceptance.observations == 1
    for _ in range(3):
        acceptance.observe("s4_t1_n4", 2.0)
    assert acceptance.estimate("s2_t1_n2") == pytest.approx(1 + 1.5 * (1 / 2.5))  # own value went stale


def test_acceptance_of_a_bucket_is_its_own_while_fresh():
    """A rollout's tail (few rows left, drafting past their answers) accepts less than a full
    batch: each bucket decides with what was measured in it; a bucket never run takes the
    config's overall value; a bucket's value older than bucket_memory steps (plain ones
    count) gives way to it too, and its next observation starts it over. seed_rows=0: a
    bucket's first rows count fully (a running mean over rows, then a memory of bucket_rows)."""
    acceptance = AcceptanceEstimate({"s2_t1_n2": 2.5}, weight=0.5, stale_after=50, bucket_memory=4, seed_rows=0)
    acceptance.observe("s2_t1_n2", 2.8, batch=64)
    acceptance.observe("s2_t1_n2", 1.5, batch=2)
    acceptance.observe("s2_t1_n2", 2.6, batch=48)
    assert acceptance.estimate("s2_t1_n2", 2) == pytest.approx(1.5)
    assert acceptance.estimate("s2_t1_n2", 64) == pytest.approx((64 * 2.8 + 48 * 2.6) / 112)  # 48 rows: bucket of 64
    overall = acceptance.estimate("s2_t1_n2")
    assert acceptance.estimate("s2_t1_n2", 8) == pytest.approx(overall)  # no steps at 8: the overall value
    for _ in range(3):
        acceptance.observe("nosd", 1.0, batch=64)
    assert acceptance.estimate("s2_t1_n2", 2) == pytest.approx(overall)  # 4 steps since: stale
    acceptance.observe("s2_t1_n2", 1.9, batch=2)
    assert acceptance.estimate("s2_t1_n2", 2) == pytest.approx(1.9)  # started over, not 1.5's mean


def test_acceptance_of_a_bucket_counts_rows_not_steps():
    """At 1 row a step's acceptance is one row's luck (an s4 step accepts 0-4 drafts): ten
    steps that alternate 1 and 5 tokens at 1 row leave the bucket near its seed and near the
    mean, where a per-step EMA swung 40% with each; one step of 64 rows moves it half way."""
    acceptance = AcceptanceEstimate({"s4_t1_n4": 3.0}, weight=0.2, bucket_rows=64, seed_rows=8)
    seen = []
    for value in [1.0, 5.0] * 5:
        acceptance.observe("s4_t1_n4", value, batch=1)
        seen.append(acceptance.estimate("s4_t1_n4", 1))
    assert max(seen) - min(seen) < 0.5 and acceptance.estimate("s4_t1_n4", 1) == pytest.approx(3.0, abs=0.2)
    acceptance.observe("s4_t1_n4", 2.0, batch=64)
    before = acceptance.estimate("s4_t1_n4", 64)  # seeded from the overall value, then 64 rows of 2.0
    assert before < 2.3


def test_geometric_prior_and_prior_cost_have_the_right_shape():
    assert geometric_accept_len("s4_t1_n4", 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625)
    assert geometric_accept_len("s3_t2_n6", 0.5) > geometric_accept_len("s3_t1_n3", 0.5)
    prior = PriorCost()
    ratio = [prior.predict("s8_t1_n8", b, 0) / prior.predict("nosd", b, 0) for b in (1, 64)]
    assert 1.3 < ratio[0] < ratio[1]  # verifying 9 tokens costs relatively more at large batch
