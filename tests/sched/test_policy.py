"""The decision rule: picks the fastest config per batch, with hysteresis that holds
against noisy timings and still follows a real change of batch size."""

from __future__ import annotations

import math
import random

import pytest

from respec.sched.cost_model import CostModel
from respec.sched.policy import SchedulerPolicy
from tests.sched.test_cost_model import synthetic_profile, synthetic_time

CANDIDATES = ("s2_t1_n2", "s4_t1_n4")
ACCEPT = {"nosd": 1.0, "s2_t1_n2": 2.5, "s4_t1_n4": 3.5}


def policy(**kwargs) -> SchedulerPolicy:
    return SchedulerPolicy(CostModel.build(CANDIDATES, synthetic_profile()), CANDIDATES, **kwargs)


def test_first_decision_is_the_predicted_fastest_with_every_candidate_in_it():
    small, large = policy().decide(1, 16), policy().decide(64, 16)
    assert (small.config, large.config) == ("s4_t1_n4", "nosd")
    assert small.switched and set(small.predicted) == {"nosd", *CANDIDATES}
    assert small.shape.name == "s4_t1_n4" and large.shape is None
    assert "batch 1" in small.reason


def test_switch_waits_for_patience_consecutive_decisions():
    rule = policy(patience=3, margin=0.05)
    assert rule.decide(64, 16).config == "nosd"
    made = [rule.decide(1, 16) for _ in range(3)]
    assert [d.config for d in made] == ["nosd", "nosd", "s4_t1_n4"]
    assert [d.switched for d in made] == [False, False, True]
    assert "1/3" in made[0].reason and "switch nosd -> s4_t1_n4" in made[2].reason


def test_an_interrupted_streak_starts_again():
    rule = policy(patience=2)
    rule.decide(64, 16)
    assert rule.decide(1, 16).config == "nosd"
    assert rule.decide(64, 16).config == "nosd"  # the streak is broken
    assert rule.decide(1, 16).config == "nosd"
    assert rule.decide(1, 16).config == "s4_t1_n4"


def test_noisy_timings_near_a_tie_do_not_flap():
    """Two configs within the margin of each other: +-10% noise on every live step moves
    the predictions around, and the decision stays put."""
    rule = policy(margin=0.15, patience=2, probe_every=0)
    model = rule.model
    batch = next(b for b in range(1, 65)
                 if abs(model.tokens_per_s("s2_t1_n2", b, 16) / model.tokens_per_s("nosd", b, 16) - 1) < 0.05)
    noise = random.Random(0)
    first = rule.decide(batch, 16).config
    configs = []
    for _ in range(200):
        config = rule.current
        step = synthetic_time(config, batch, 16) * noise.uniform(0.9, 1.1)
        rule.observe(config, batch, 16, step, ACCEPT[config])
        configs.append(rule.decide(batch, 16).config)
    switches = sum(a != b for a, b in zip([first, *configs], configs, strict=False))
    assert switches == 0


def test_a_shrinking_batch_moves_from_plain_decoding_to_sd():
    rule = policy(margin=0.05, patience=2, probe_every=0)
    chosen = [rule.decide(batch, 16).config for batch in range(64, 0, -1) for _ in range(2)]
    assert chosen[0] == "nosd" and chosen[-1] == "s4_t1_n4"
    switches = sum(a != b for a, b in zip(chosen, chosen[1:], strict=False))
    assert switches <= 3  # nosd -> (s2 ->) s4, no back and forth


def test_a_config_the_profile_got_wrong_is_probed_and_then_chosen():
    """The profile says s4 costs 1.5x what it does, so at batch 1 s2 looks best and s4 is
    never chosen; a probe runs s4 once every probe_every decisions, its live timing
    corrects it, and the rule moves to it. Without probes it is never tried."""
    def run(probe_every: int) -> list[str]:
        model = CostModel.build(CANDIDATES, synthetic_profile(), ema=0.5)
        rule = SchedulerPolicy(model, CANDIDATES, margin=0.05, patience=2, probe_every=probe_every, probe_within=0.5)
        for point in rule.model.base.table["s4_t1_n4"].values():
            point[1][:] = [t + math.log(1.5) for t in point[1]]
        rule.model.base.memo.clear()
        chosen = []
        for _ in range(60):
            config = rule.decide(1, 16).config
            rule.observe(config, 1, 16, synthetic_time(config, 1, 16), ACCEPT[config])
            chosen.append(config)
        return chosen, rule.current

    assert set(run(probe_every=0)[0]) == {"s2_t1_n2"}
    probed, current = run(probe_every=10)
    assert current == "s4_t1_n4" and probed[-20:].count("s4_t1_n4") >= 18  # a probe or two of others


def test_plain_decoding_is_probed_however_slow_the_profile_says_it_is():
    """A profile that makes plain decoding look 2x slower than it is at batch 64 (a stalled
    measurement), far outside probe_within: probes re-measure it anyway and the rule goes
    back to it (truly 16% faster than s4 there)."""
    model = CostModel.build(["s4_t1_n4"], synthetic_profile(), ema=0.5)
    for point in model.base.table["nosd"].values():
        point[1][:] = [t + math.log(2) for t in point[1]]
    rule = SchedulerPolicy(model, ["s4_t1_n4"], probe_every=10, probe_within=0.1)
    chosen = []
    for _ in range(80):
        config = rule.decide(64, 16).config
        rule.observe(config, 64, 16, synthetic_time(config, 64, 16), ACCEPT[config])
        chosen.append(config)
    assert chosen[0] != "nosd" and rule.current == "nosd"


@pytest.mark.parametrize("kwargs, message", [
    ({"margin": -0.1}, "margin must be >= 0"),
    ({"patience": 0}, "patience must be >= 1"),
    ({"probe_within": 1.0}, "probe_within in"),
])
def test_bad_rule_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        policy(**kwargs)


def test_a_bad_candidate_name_is_refused_by_name():
    with pytest.raises(ValueError, match="'s4-t1-n4' is not of the form"):
        SchedulerPolicy(CostModel.build([], None), ["s4-t1-n4"])
