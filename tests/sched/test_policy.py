"""The decision rule: per batch bucket it measures plain decoding and the promising shapes,
picks the fastest measured one, holds against noise and switch costs, and still follows
a real change of batch size or acceptance."""

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


def simulate(rule: SchedulerPolicy, batches, slowdown=None, accept=None, noise=0.0, switch_s=0.0,
             seed=0) -> list[str]:
    """Decide, run the step on a synthetic machine, observe; returns what ran each step.
    `slowdown[config]`: live time / profiled time; `switch_s`: a first SD step's extra cost per row."""
    slowdown, accept = slowdown or {}, accept or ACCEPT
    rng, ran, previous = random.Random(seed), [], None
    for batch in batches:
        config = rule.decide(batch, 16).config
        step = synthetic_time(config, batch, 16) * slowdown.get(config, 1.0) * (1 + rng.uniform(-noise, noise))
        if previous is not None and config != previous and config != "nosd":
            step += switch_s * batch
        rule.observe(config, batch, 16, step, accept[config])
        ran.append(config)
        previous = config
    return ran


def switches(ran: list[str]) -> int:
    return sum(a != b for a, b in zip(ran, ran[1:], strict=False))


def test_first_decision_is_the_predicted_fastest_with_every_candidate_in_it():
    small, large = policy().decide(1, 16), policy().decide(64, 16)
    assert (small.config, large.config) == ("s4_t1_n4", "nosd")
    assert small.switched and set(small.predicted) == {"nosd", *CANDIDATES}
    assert small.shape.name == "s4_t1_n4" and large.shape is None
    assert "batch 1" in small.reason and small.kind == "start"


def test_each_bucket_measures_plain_decoding_and_the_promising_shapes_then_settles():
    """At batch 1 the profile says s4; live SD steps are 3x slower than profiled, so plain
    decoding is truly fastest there. The rule measures s4 (running), then nosd, then at
    most s2 (the SD slowdown s4 measured carries to it, but a profile may be off by the
    spread, 20% until measured: at 1 row three steps are cheap), settles on nosd and does
    not come back to SD: never worse than plain decoding."""
    rule = policy(explore_steps=3, probe_every=0)
    ran = simulate(rule, [1] * 60, slowdown={"s2_t1_n2": 3.0, "s4_t1_n4": 3.0})
    assert ran[:6] == ["s4_t1_n4"] * 3 + ["nosd"] * 3  # the start step is measured too
    # at most explore_steps + 1: the first step after a switch of unknown cost measures nothing
    assert set(ran[6:]) <= {"nosd", "s2_t1_n2"} and ran[6:].count("s2_t1_n2") <= 4
    assert set(ran[16:]) == {"nosd"}
    assert rule.kinds["switch"] == 0


@pytest.mark.parametrize("slow", [1.0, 1.6])
def test_it_converges_to_the_best_static_config_of_every_bucket(slow):
    """Whatever the live machine does to SD (as profiled, or 1.6x slower), after a visit per
    bucket the rule runs the config that is truly fastest in that bucket."""
    slowdown = {"s2_t1_n2": slow, "s4_t1_n4": slow}
    rule = policy(probe_every=0)
    for batch in (64, 32, 16, 8, 4, 2, 1):
        simulate(rule, [batch] * 40, slowdown)
        truth = {c: batch * ACCEPT[c] / (synthetic_time(c, batch, 16) * slowdown.get(c, 1.0)) for c in ACCEPT}
        assert truth[rule.current] >= 0.95 * max(truth.values()), f"batch {batch}"  # margin 5%


def test_switch_waits_for_patience_dwell_and_margin():
    """Both configs measured at bucket 3, s2 chosen; then the drafter's acceptance drops
    live, and the rule moves to nosd only after `patience` agreeing decisions, and never
    within `min_dwell` decisions of the last switch."""
    rule = SchedulerPolicy(CostModel.build(["s2_t1_n2"], synthetic_profile()), ["s2_t1_n2"], patience=3,
                           min_dwell=20, probe_every=0, explore_steps=2)
    ran = simulate(rule, [8] * 12)
    assert ran[-1] == "s2_t1_n2" and rule.kinds["settle"] == 1
    ran = simulate(rule, [8] * 40, accept={"nosd": 1.0, "s2_t1_n2": 1.2})
    first_nosd = ran.index("nosd")
    assert first_nosd >= 13 and set(ran[first_nosd:]) == {"nosd"}  # 6 without the dwell (20 since settling)
    assert rule.kinds["switch"] == 1


def test_noisy_timings_in_a_live_like_run_do_not_flap():
    """A live RL run: the batch wanders 20-32 rows, with rollout tails down to 1, and every
    step's timing has +-15% noise. After each bucket's exploration the rule stays put."""
    rng = random.Random(1)
    batches = []
    for _ in range(40):  # 40 RL steps: a full batch for a while, then a tail
        batches += [rng.randint(20, 32) for _ in range(30)] + list(range(24, 0, -3))
    rule = policy(probe_every=0)
    ran = simulate(rule, batches, slowdown={"s2_t1_n2": 1.3, "s4_t1_n4": 1.3}, noise=0.15)
    later = ran[len(ran) // 2:]
    assert switches(later) <= 2 * 20  # into and out of SD at most once per tail
    assert rule.kinds["switch"] < 10  # what moves it is the bucket changing, not noise
    assert ran.count("s4_t1_n4") + ran.count("s2_t1_n2") < 0.2 * len(ran)  # SD: the tail's small buckets


def test_a_gain_smaller_than_the_switch_cost_is_not_taken():
    """Bucket 5 (nosd best) and bucket 3 (s2 ~8% faster: acceptance 2.1) alternate every 12
    steps, and each first SD step costs 2.5 ms more per row (20 ms at 8 rows): s2's gain
    over min_dwell steps is a fraction of a millisecond. Once the cost is measured (per row),
    the rule stays on nosd in both buckets; with free switches it goes back and forth."""
    accept = {**ACCEPT, "s2_t1_n2": 2.1, "s4_t1_n4": 2.2}
    batches = ([32] * 12 + [8] * 12) * 12
    costly = policy(probe_every=0)
    ran = simulate(costly, batches, accept=accept, switch_s=0.0025)
    assert costly.switch_cost["sd"].value == pytest.approx(0.0025, rel=0.25)
    # nosd in both buckets; the one SD step is s4 re-explored once, when bucket 3's acceptance
    # memory (bucket_memory, 200 steps) ran out and its overall value stood in
    assert ran[-100:].count("nosd") >= 99
    free = simulate(policy(probe_every=0), batches, accept=accept)
    assert switches(free[-100:]) >= 6 and free[-1] == "s2_t1_n2"


def test_probes_notice_a_drafter_that_got_better():
    """Plain decoding is chosen at batch 8 while the drafter is poor (acceptance 1.2); then
    it is distilled (2.5 / 3.5). Probes run the SD shapes for one step now and then, their
    acceptance is refreshed, and the rule goes back to SD (s4, 6% behind s2 there: the
    probe that refreshed s4 showed it clearly better than plain decoding, and s2's
    estimate stays the poor drafter's until it runs). Without probes it never does."""
    poor = {"nosd": 1.0, "s2_t1_n2": 1.2, "s4_t1_n4": 1.3}
    for probe_every, expected in ((10, "s4_t1_n4"), (0, "nosd")):
        rule = SchedulerPolicy(CostModel.build(CANDIDATES, synthetic_profile(), ema=0.5), CANDIDATES,
                               probe_every=probe_every, probe_budget=0.1)  # a probe costs ~1 step in 10
        simulate(rule, [8] * 40, accept=poor)
        assert rule.current == "nosd"
        simulate(rule, [8] * 80)
        assert rule.current == expected


def test_probes_run_where_they_are_cheap_and_not_where_sd_costs_several_steps():
    """At 64 rows SD runs 4x slower than profiled, so plain decoding is chosen and a probe of
    SD would cost several plain steps, more than probe_budget (3%) of probe_every steps: none
    runs. At 2 rows SD, 1.4x slower than profiled, is chosen, and a probe of plain decoding
    costs less than a step: they run. Switches cost 0.1 ms a row."""
    for batch, slowdown, chosen in ((64, 4.0, "nosd"), (2, 1.4, "s2_t1_n2")):
        rule = policy(probe_every=50)
        ran = simulate(rule, [batch] * 200, slowdown={"s2_t1_n2": slowdown, "s4_t1_n4": slowdown}, switch_s=1e-4)
        assert ran[-1] == chosen
        assert (rule.kinds["probe"] >= 3) == (batch == 2), f"batch {batch}"
    lifted = policy(probe_every=50, probe_budget=1.0)  # with the budget lifted they run at 64 rows too
    simulate(lifted, [64] * 200, slowdown={"s2_t1_n2": 4.0, "s4_t1_n4": 4.0}, switch_s=1e-4)
    assert lifted.kinds["probe"] >= 3


def test_plain_decoding_is_measured_however_slow_the_profile_says_it_is():
    """A profile that makes plain decoding look 2x slower than it is at batch 64 (a stalled
    measurement), far outside probe_within: it is measured anyway and chosen (truly 16%
    faster than s4 there)."""
    model = CostModel.build(["s4_t1_n4"], synthetic_profile(), ema=0.5)
    for point in model.base.table["nosd"].values():
        point[1][:] = [t + math.log(2) for t in point[1]]
    rule = SchedulerPolicy(model, ["s4_t1_n4"], probe_within=0.1)
    ran = simulate(rule, [64] * 40)
    assert ran[0] != "nosd" and rule.current == "nosd" and set(ran[-20:]) == {"nosd"}


@pytest.mark.parametrize("kwargs, message", [
    ({"margin": -0.1}, "margin must be >= 0"),
    ({"patience": 0}, "patience must be >= 1"),
    ({"min_dwell": -1}, "min_dwell >= 0"),
    ({"explore_steps": 0}, "explore_steps >= 1"),
    ({"probe_within": 1.0}, "probe_within in"),
])
def test_bad_rule_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        policy(**kwargs)


def test_a_bad_candidate_name_is_refused_by_name():
    with pytest.raises(ValueError, match="'s4-t1-n4' is not of the form"):
        SchedulerPolicy(CostModel.build([], None), ["s4-t1-n4"])


TAIL = [max(1, int(64 * 0.93**i)) for i in range(60)]  # a rollout's tail: 64 rows down to 1 in 60 steps


def big_sd_steps(ran: list[str], batches: list[int]) -> int:
    return sum(1 for config, batch in zip(ran, batches, strict=True) if batch >= 23 and config != "nosd")


def test_large_batch_explorations_fit_in_what_one_visit_can_afford():
    """Rollout tails, one after another: 64 rows down to 1 in 60 steps, so a tail passes
    through 23-64 rows in ~15 steps. A switch into SD costs 0.7 ms a row (45 ms at 64 rows,
    ~5 plain steps there), and SD at large batch is as fast as plain decoding: exploring it
    cannot pay within a visit. The rule before explored it once the buckets' history (the
    time of every tail so far) made a hoped-for gain look worth the switches, in a tail
    whose visit of bucket 6 lasts ~10 steps (11 SD steps at 23-64 rows in the third tail).
    Now a visit affords at most 3% of its expected length (or 2 steps): none, and the
    tail's last rows still run SD, which wins at 1-3 rows."""
    rule = policy(probe_every=50, switch_cost_s=0.7e-3)
    for seed in range(40):
        ran = simulate(rule, TAIL, switch_s=0.7e-3, noise=0.1, seed=seed)
        assert big_sd_steps(ran, TAIL) == 0, f"tail {seed}"
    assert "nosd" not in ran[-5:]
