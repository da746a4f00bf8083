"""Scheduler: listens to the Generator's GenerationStats and tells it, with a
SchedulerDecision, whether to speculate and with which (s, t, n) draft shape.

Every stats message refreshes the cost model (the live step time of the config that ran,
its live acceptance) and asks the decision rule (`respec.sched.policy`) for the config
with the most accepted tokens/s at the live batch bucket, measured there; a decision is
sent only when the config changes, with the reason and every candidate's predicted
speed, so the trace shows why. With `profile` it starts from a profile measured by
`respec profile`; without one, from a rough built-in prior that only orders what is
explored first: every choice is made between configs measured live in that bucket.
Every `report_every` decisions it reports how many of each kind it made (metrics.jsonl).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from respec.messages import Envelope, GenerationStats, SchedulerDecision
from respec.runtime import Actor, handles
from respec.sched.cost_model import CostModel
from respec.sched.policy import SchedulerPolicy, check_candidates
from respec.sched.profile import DEFAULT_CONFIGS, NOSD, Profile, device_name


class Scheduler(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        profile: str = ""  # a `respec profile` JSON; "" = built-in prior, learned online
        candidates: tuple[str, ...] = DEFAULT_CONFIGS  # draft shapes to choose from (plain decoding always is one)
        margin: float = 0.05  # switch only for a predicted gain above this (relative)
        patience: int = 2  # ... seen by this many consecutive decisions
        min_dwell: int = 8  # ... at least this many decisions after the last switch
        explore_steps: int = 3  # live steps of a config in a batch bucket before its estimate there is trusted
        switch_cost_s: float = 0.0  # what a switch costs per row before one is measured (it is, online)
        ema: float = 0.2  # weight of a new live observation (step time, acceptance)
        stale_after: int = 50  # SD steps after which a config's own acceptance gives way to prior x drift
        probe_every: int = 50  # every N decisions, run a config not seen lately for one step (0: never)
        probe_within: float = 0.2  # how far a profile's prediction is assumed off until explorations measure it
        confidence: float = 1.0  # a measured gain must exceed margin + this many standard errors of its noise
        probe_budget: float = 0.03  # a probe (its step and two switches) costs at most this share of probe_every steps
        visit_budget: float = 0.03  # explorations and probes in one stay in a bucket cost at most this share of it
        visit_floor_steps: float = 2.0  # ... or this many of the running config's steps, whichever is more
        report_every: int = 200  # decisions between metrics rows (0: never)

    sends = (SchedulerDecision,)

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        problems = [f"params.{p}" for p in param_problems(params)]
        for generator in plan.senders_of(GenerationStats):
            gen = plan.actors[generator].params
            if getattr(gen, "stats_every", 1) == 0:
                problems.append(f"actors.{generator}.params.stats_every is 0: the Generator never sends the "
                                f"GenerationStats this Scheduler decides from; set it to 1 or more")
            if getattr(gen, "drafter", "") == "none" and params.candidates:
                problems.append(f"params.candidates: actors.{generator} has drafter 'none' and "
                                f"cannot speculate; use candidates: []")
        return problems

    async def on_start(self) -> None:
        problems = param_problems(self.params)
        if problems:
            raise ValueError("Scheduler params: " + "; ".join(problems))
        profile = Profile.load(self.params.profile) if self.params.profile else None
        if profile is not None and profile.key.get("device") != device_name("cpu"):
            self.log.warning("scheduler_foreign_profile", profiled_on=profile.key.get("device"),
                             note="live step timings will correct it")
        model = CostModel.build(self.params.candidates, profile, self.params.ema, self.params.stale_after)
        params = self.params
        self.policy = SchedulerPolicy(model, params.candidates, params.margin, params.patience,
                                      probe_every=params.probe_every, probe_within=params.probe_within,
                                      min_dwell=params.min_dwell, explore_steps=params.explore_steps,
                                      switch_cost_s=params.switch_cost_s, probe_budget=params.probe_budget,
                                      confidence=params.confidence, visit_budget=params.visit_budget,
                                      visit_floor_steps=params.visit_floor_steps)
        self.decisions = 0

    @handles(GenerationStats)
    async def on_stats(self, stats: GenerationStats, envelope: Envelope) -> None:
        if stats.active_rows < 1:
            return  # nothing ran and nothing will: no decision to make
        batch, context = stats.active_rows, stats.context_len_mean
        if stats.step_time_s > 0 and (stats.config == NOSD or stats.config in self.policy.configs):
            self.policy.observe(stats.config, batch, context, stats.step_time_s, stats.mean_accept_len)
        decision = self.policy.decide(batch, context)
        self._report()
        if not decision.switched:
            return
        self.decisions += 1
        shape = decision.shape
        self.log.info("scheduler_decision", config=decision.config, batch=batch, kind=decision.kind,
                      reason=decision.reason)
        await self.send(SchedulerDecision(
            decision_id=self.decisions, speculate=shape is not None, steps=shape.steps if shape else 0,
            branch=shape.branch if shape else 1, num_draft=shape.num_draft if shape else 0, batch_size=batch,
            predicted_tokens_per_s=decision.predicted, reason=decision.reason))


    def _report(self) -> None:
        """Decisions so far by kind, and the decisions sent (config changes): flapping shows here."""
        every, made = self.params.report_every, self.policy.decisions
        if every and made % every == 0:
            self.report(made, scheduler_sent=self.decisions,
                        **{f"scheduler_{kind}": count for kind, count in self.policy.kinds.items()},
                        **{f"scheduler_switch_cost_{k}_ms": 1e3 * e.value for k, e in self.policy.switch_cost.items()})


# (parameter, smallest allowed value, what it is): the checks that are a lower bound alone.
_LOWER_BOUNDS = (
    ("patience", 1, "at least 1 decision"),
    ("probe_budget", 0, "a share of probe_every steps' time, >= 0"),
    ("probe_every", 0, "0 (never) or more decisions"),
    ("confidence", 0, "standard errors, >= 0"),
    ("visit_budget", 0, "a share of a bucket visit's time, >= 0"),
    ("visit_floor_steps", 0, "0 or more steps"),
    ("min_dwell", 0, "0 or more decisions"),
    ("explore_steps", 1, "at least 1 step"),
    ("stale_after", 1, "at least 1 step"),
)


def param_problems(params: Scheduler.Params) -> list[str]:
    """Each bad parameter, named with its value and what it should be."""
    problems = []
    if params.profile and not Path(params.profile).is_file():
        problems.append(f"profile: {params.profile!r} does not exist (make it with `respec profile CONFIG --out FILE`)")
    elif params.profile:
        try:
            profiled = set(Profile.load(params.profile).configs)
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"profile: {params.profile!r} cannot be read: {error}")
        else:
            missing = [c for c in [NOSD, *params.candidates] if c not in profiled]
            if missing:
                problems.append(f"candidates: {', '.join(missing)} not profiled in {params.profile!r} "
                                f"(it has {', '.join(sorted(profiled))})")
    try:
        check_candidates(params.candidates)
    except ValueError as error:
        problems.append(f"candidates: {error}")
    if params.margin < 0:
        problems.append(f"margin: {params.margin} is negative; a relative gain such as 0.05")
    if not 0 < params.ema <= 1:
        problems.append(f"ema: {params.ema}; a weight in (0, 1]")
    if not 0 <= params.probe_within < 1:
        problems.append(f"probe_within: {params.probe_within}; a relative slowdown in [0, 1)")
    for name, least, meaning in _LOWER_BOUNDS:
        if getattr(params, name) < least:
            problems.append(f"{name}: {getattr(params, name)}; {meaning}")
    return problems
