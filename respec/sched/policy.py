"""The Scheduler's decision rule, free of any runtime: the actor and `respec bench adaptive`
run this same code.

Each decision predicts accepted tokens/s of plain decoding and of every candidate shape
for the live batch and context (cost_model.py). What it does with them is built for a
live RL run, where the batch changes every step and single step timings are noisy:

- **Per bucket, measured.** Everything is learned and compared per batch octave (the
  bucket: 6-11 rows, 12-22, ...). A config's prediction in a bucket is only trusted once
  it has run `explore_steps` steps there (its own live correction); before that it is
  explored. Explored in each bucket: plain decoding (always: the baseline SD must beat),
  then an SD shape only if it is *worth it*: were its prediction off in its favour by the
  spread predictions have shown on this machine (learned from every exploration, starting
  at `probe_within`), it would beat the best measured config by the margin, and that
  gain over as long again as the bucket has run pays for its steps and switches. An
  exploration once begun is finished, and a close call (within the noise of the best
  other) is measured longer, up to the steps an estimate averages, instead of being
  decided by three noisy steps. After it the rule settles on what the bucket settled on
  before (plain decoding the first time) unless the fastest measured config beats that by
  the margin plus `confidence` standard errors.
- **Hysteresis** among measured configs: leave the current one only for a predicted gain
  above `margin` plus `confidence` standard errors (the bucket's measured step-time
  noise over the steps each estimate averages; a step off by more than 3 sigma is held
  to 3 sigma before it is learned, so a stall does not move an estimate), and only if the time the gain saves over `min_dwell` steps exceeds what
  a switch costs. Within a bucket the gain must also be seen by `patience` consecutive
  decisions, at least `min_dwell` decisions after the last switch: there a change of
  prediction is noise until repeated. On entering another bucket it need not: the batch
  did change (a rollout's tail, a full batch again), and waiting `patience` steps there
  ran the tail's SD shape for several steps of the next full batch.
- **Switch cost**, measured per row: the first step of a config after another (into SD
  every row's drafter features are rebuilt and the EAGLE head catches up over the positions
  plain decoding produced) minus its prediction, divided by the rows, kept per kind of
  switch (into SD, into plain decoding). Per row because that work is: a switch measured
  at 4 rows said nothing about one at 64. That step's excess is taken out before it
  corrects the step-time model, so one slow first step does not make a config look slow.
- **Probes** keep estimates fresh: every `probe_every` decisions, the config predicted
  fastest among those not run in this bucket for `probe_every` decisions runs for a
  single step, however slow it is predicted, if that step and its two switches cost at
  most `probe_budget` of the `probe_every` steps' time: the acceptance of a drafter being
  distilled changes, and only a step of SD shows by how much. A probe of SD at 64 rows
  cost 5.6 plain steps (SD's step there, every row's rebuild), a tenth of a long-tail
  rollout; at a few rows it costs about one step, and what it measures (acceptance) is
  shared with the large buckets.
- **A budget per visit** (the steps from entering a bucket to leaving it): the explorations
  and probes begun in it may cost, together, `visit_budget` of its expected length (as
  long again as it has lasted), or `visit_floor_steps` steps, whichever is more. "Worth
  it" weighs a gain over the bucket's whole past; this is what one rollout can afford: a
  tail passes 23-64 rows in ~15 steps, where an SD exploration costs ~10 plain steps.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from respec.engine.drafters.base import DraftShape
from respec.sched.cost_model import CostModel, Ema, octave
from respec.sched.profile import NOSD


@dataclass(frozen=True)
class Decision:
    config: str  # "nosd" or "s{s}_t{t}_n{n}"
    switched: bool  # differs from the previous decision's config
    batch: int
    predicted: dict[str, float] = field(default_factory=dict)  # config -> tokens/s
    reason: str = ""
    kind: str = "keep"  # start | keep | switch | bucket | explore | settle | probe

    @property
    def shape(self) -> DraftShape | None:
        return None if self.config == NOSD else DraftShape.parse(self.config)


def check_candidates(candidates: list[str] | tuple[str, ...]) -> list[str]:
    """Parsed and de-duplicated; a bad name raises ValueError naming it."""
    seen = []
    for name in candidates:
        if name != NOSD:
            DraftShape.parse(name)
        if name not in seen:
            seen.append(name)
    return seen


DEFAULT_NOISE = 0.1  # a step's timing noise (log) assumed until a bucket has measured its own


def _kind(config: str) -> str:
    return "nosd" if config == NOSD else "sd"


class SchedulerPolicy:
    def __init__(self, model: CostModel, candidates: list[str] | tuple[str, ...], margin: float = 0.05,
                 patience: int = 2, initial: str | None = None, probe_every: int = 50,
                 probe_within: float = 0.2, min_dwell: int = 8, explore_steps: int = 3,
                 switch_cost_s: float = 0.0, probe_budget: float = 0.03, confidence: float = 1.0,
                 visit_budget: float = 0.03, visit_floor_steps: float = 2.0) -> None:
        if probe_every < 0 or not 0 <= probe_within < 1 or probe_budget < 0 or visit_budget < 0:
            raise ValueError(f"probe_every must be >= 0 (0: never), probe_within in [0, 1), probe_budget >= 0 and "
                             f"visit_budget >= 0, got {probe_every}, {probe_within}, {probe_budget} and {visit_budget}")
        if margin < 0 or confidence < 0:
            raise ValueError(f"margin must be >= 0 (a relative gain) and confidence >= 0, got {margin} and {confidence}")
        if patience < 1 or min_dwell < 0 or explore_steps < 1:
            raise ValueError(f"patience must be >= 1 decision, min_dwell >= 0, explore_steps >= 1; got "
                             f"{patience}, {min_dwell}, {explore_steps}")
        self.model = model
        self.configs = check_candidates([NOSD, *candidates])
        self.margin, self.patience, self.min_dwell, self.explore_steps = margin, patience, min_dwell, explore_steps
        self.probe_every, self.probe_within, self.probe_budget = probe_every, probe_within, probe_budget
        self.confidence, self.visit_budget, self.visit_floor_steps = confidence, visit_budget, visit_floor_steps
        self.current = initial
        self.pending, self.streak = None, 0
        self.decisions = self.since_switch = 0
        self.bucket: int | None = None  # the batch bucket of the last decision
        self.settled: set[int] = set()  # buckets whose exploration is over and acted on
        self.home: dict[int, str] = {}  # bucket -> what its last exploration settled on
        self.last_run: dict[tuple[str, int], int] = {}  # (config, bucket) -> decision count when it last ran
        self.last_config: str | None = None  # what the last decision told to run (a probe, maybe)
        self.last_observed: str | None = None  # the config of the last step observed
        # seconds per row in the step: a switch into SD rebuilds every row's drafter features
        self.switch_cost = {k: Ema(0.2, seed=switch_cost_s, seed_counts=False) for k in ("nosd", "sd")}
        # How far a config's prediction was from what it measured once explored, |log ratio|:
        # how much to hope for from a config not measured yet. Starts at probe_within.
        self.spread = Ema(0.2, seed=probe_within, seed_counts=False)
        self.exploring: set[tuple[str, int]] = set()  # (config, bucket) being explored
        self.hoped: dict[tuple[str, int], float] = {}  # (config, bucket) -> tokens/s predicted when explored
        self.noise: dict[int, Ema] = {}  # bucket -> squared log error of a measured config's step time
        self.bucket_s: Counter[int] = Counter()  # seconds of steps run per bucket: how long it lasts
        # A visit: the steps from entering a bucket to leaving it (a rollout's full batch, one
        # stretch of its tail). What explorations and probes may cost is capped per visit.
        self.visit_s = 0.0  # seconds of steps run in the current visit so far
        self.visit_spent = 0.0  # predicted cost of the explorations and probes begun in it
        self.kinds: Counter[str] = Counter()  # decisions by kind, for the trace and benches

    # ------------------------------------------------------------------ learning

    def observe(self, config: str, batch: float, context: float, step_s: float, accept_len: float) -> None:
        """A live step of `config`; the first after a switch also measures the switch cost."""
        raw_s = step_s
        kind = _switch_kind(self.last_observed, config)
        if kind is not None and batch >= 1:
            cost = self.switch_cost[kind]
            if self.measured(config, batch):  # else its prediction's own error would pass for a switch cost
                excess = step_s - self.model.step_time(config, batch, context)
                cost.add(min(excess, step_s) / batch)  # unclipped below: noise either way averages out
            if not cost.count:  # a switch step, cost unknown: its time says nothing clean about the config
                step_s = 0.0
            step_s -= min(max(cost.value, 0.0) * batch, 0.5 * step_s)  # what the step costs without the switch
        self.last_observed = config
        bucket = octave(batch)
        if bucket == self.bucket:
            self.visit_s += raw_s
        if step_s > 0:
            step_s = self._learn_noise(config, batch, context, step_s)
            self.model.observe(config, batch, context, step_s, accept_len)
            self.bucket_s[bucket] += step_s
        else:
            self.model.acceptance.observe(config, accept_len, batch)
        self.last_run[(config, bucket)] = self.decisions
        self._learn_spread(config, batch, context)

    def measured(self, config: str, batch: float) -> bool:
        return self.model.correction.count(config, batch) >= self.explore_steps

    def _learn_noise(self, config: str, batch: float, context: float, step_s: float) -> float:
        """A measured config's step against its own estimate: the bucket's timing noise,
        which sets how big a measured gain must be before it is believed (the mean absolute
        log error, x 1.25: sigma for a normal). Returns the step time to learn from, held
        within 3 sigma of the estimate: a step another process stalled 3x moved the
        current config's estimate by 13% (an EMA step, clipped at 2x), and a rival measured
        a few steps long ago then looked 15-30% better. A real change still gets through,
        3 sigma a step."""
        if not self.measured(config, batch):
            return step_s
        noise = self.noise.setdefault(octave(batch), Ema(0.1))
        expected = self.model.step_time(config, batch, context)
        error = math.log(step_s / expected)
        noise.add(min(abs(error), 0.5))
        if noise.count < 3:
            return step_s
        bound = 3 * self._sigma(octave(batch))
        return expected * math.exp(min(max(error, -bound), bound))

    def _sigma(self, bucket: int) -> float:
        noise = self.noise.get(bucket)
        return 1.25 * noise.value if noise is not None and noise.count >= 3 else DEFAULT_NOISE

    def _learn_spread(self, config: str, batch: float, context: float) -> None:
        """Once an explored config is measured: how far off its prediction was."""
        key = (config, octave(batch))
        if key in self.hoped and self.measured(config, batch):
            hoped = self.hoped.pop(key)
            self.spread.add(abs(math.log(self.model.tokens_per_s(config, batch, context) / hoped)))

    # ------------------------------------------------------------------ deciding

    def decide(self, batch: int, context: float) -> Decision:
        batch = max(batch, 1)
        predicted = {c: self.model.tokens_per_s(c, batch, context) for c in self.configs}
        self.decisions += 1
        self.since_switch += 1
        entering = octave(batch) != self.bucket
        if entering:
            self._enter(octave(batch))
        if self.current is None or self.current not in predicted:
            kind, target = "start", max(predicted, key=predicted.get)
            reason = f"start: {target} fastest at batch {batch}"
            if not self.measured(target, batch):
                self._begin(target, self.bucket, predicted)
        else:
            kind, target, reason = self._choose(batch, context, predicted, entering)
        if target != self.current:
            self.current, self.since_switch, self.pending, self.streak = target, 0, None, 0
        config = self._probe(batch, context, predicted)
        if config != self.current:
            kind, reason = "probe", f"probe {config} for one step ({reason})"
        self.kinds[kind] += 1
        switched, self.last_config = config != self.last_config, config
        return Decision(config, switched, batch, predicted, reason, kind)

    def _enter(self, bucket: int) -> None:
        """A visit of `bucket` begins: its time and what its explorations cost start over."""
        self.bucket, self.visit_s, self.visit_spent = bucket, 0.0, 0.0

    def _visit_left(self, step_s: float) -> float:
        """Seconds the explorations and probes of this visit may still cost: `visit_budget` of
        the visit's expected length, less what those begun in it cost. Expected: as long again
        as it has lasted so far. Not the bucket's past visits: a rollout's tail passes through
        the buckets of its full batch in a few steps each, and the first tail after a long
        phase at 64 rows would count on another long one. `_worth_exploring` asks whether an
        exploration pays over the bucket's life; this, what the current visit can afford. On
        the quiet host one SD step at 30-60 rows costs 3-4 plain steps and a switch into SD
        ~0.7 ms a row, so one exploration with its switches costs ~10 plain steps at 64 rows:
        about a tenth of a one-second tail. At least `visit_floor_steps` of the running config's
        steps (`step_s`) are allowed: at a few rows an exploration costs about a step, it is
        how SD's wins there are found, and a visit's first steps say little of its length."""
        expected = 2 * self.visit_s
        return max(self.visit_budget * expected, self.visit_floor_steps * step_s) - self.visit_spent

    def _choose(self, batch: int, context: float, predicted: dict[str, float],
                entering: bool) -> tuple[str, str, str]:
        """(kind, config to run, reason)."""
        target = self._to_explore(batch, context, predicted)
        if target is not None:
            self.settled.discard(self.bucket)
            self._begin(target, self.bucket, predicted)
            verb = "exploring" if target == self.current else f"explore {target}:"
            return "explore", target, (f"{verb} {self.model.correction.count(target, batch)}/{self.explore_steps} "
                                       f"steps measured at bucket {octave(batch)} (batch {batch})")
        measured = [c for c in self.configs if self.measured(c, batch)]
        best = max(measured, key=predicted.get)
        if self.current not in measured or self.bucket not in self.settled:  # exploration over: go by what it measured
            self.settled.add(self.bucket)
            home = self._home(best, predicted, batch)
            self.home[self.bucket] = home
            return "settle", home, f"settle on {home}: fastest measured at bucket {octave(batch)} (batch {batch})"
        return self._hysteresis(best, predicted, batch, entering)

    def _home(self, best: str, predicted: dict[str, float], batch: int) -> str:
        """What to settle on after an exploration: what the bucket settled on before (plain
        decoding the first time), unless the fastest measured config beats it by more than
        the margin and the noise. Taking the fastest of a few noisy steps each, as before,
        settled on whichever of configs a few percent apart had the luckiest steps, and the
        next exploration's settle moved again."""
        home = self.home.get(self.bucket, NOSD)
        if home not in predicted or not self.measured(home, batch):
            return best
        needed = self.margin + self.confidence * self._noise(home, best, batch)
        return best if predicted[best] / predicted[home] - 1 > needed else home

    def _to_explore(self, batch: int, context: float, predicted: dict[str, float]) -> str | None:
        """The config to measure next in this bucket, if any. One begun is finished (its
        first steps are noisy; dropping it after one step paid its switch for nothing, and
        the next rollout began it again). Then plain decoding: the baseline SD must beat
        here, cheap to measure. Then the SD shape predicted fastest among those worth it."""
        bucket = octave(batch)
        if (self.current, bucket) in self.exploring:
            if self._undecided(self.current, batch, predicted):
                return self.current
            self.exploring.discard((self.current, bucket))
        if not self.measured(NOSD, batch):
            return NOSD
        measured = [c for c in self.configs if self.measured(c, batch)]
        best = max(measured, key=predicted.get)
        costs = {c: self._explore_cost(c, best, batch, context, predicted) for c in self.configs if c not in measured}
        step_best = self.model.step_time(best, batch, context)
        worth = [c for c, cost in costs.items()
                 if cost <= self._visit_left(step_best) and self._worth_exploring(c, best, batch, cost, predicted)]
        target = max(worth, key=predicted.get, default=None)
        if target is not None:
            self.visit_spent += costs[target]
        return target

    def _begin(self, config: str, bucket: int, predicted: dict[str, float]) -> None:
        if (config, bucket) not in self.exploring:
            self.exploring.add((config, bucket))
            self.hoped[(config, bucket)] = predicted[config]

    def _undecided(self, config: str, batch: int, predicted: dict[str, float]) -> bool:
        """Is the config being explored still to be measured: fewer than explore_steps steps,
        or, up to the steps its estimate averages, within the noise of the best other one?
        A close call is settled by measuring longer, not by a coin toss: the steps it takes
        cost little, the two being close."""
        steps = self.model.correction.count(config, batch)
        if steps < self.explore_steps:
            return True
        others = [c for c in self.configs if c != config and self.measured(c, batch)]
        if not others or steps >= self._averaged_steps():
            return False
        best = max(others, key=predicted.get)
        gap = abs(math.log(predicted[config] / predicted[best]))
        return gap < self.confidence * self._noise(config, best, batch)

    def _averaged_steps(self) -> float:
        """How many steps a config's step-time estimate averages: an EMA with weight w, about (2 - w) / w."""
        weight = self.model.correction.weight
        return (2 - weight) / weight

    def _explore_cost(self, config: str, best: str, batch: int, context: float,
                      predicted: dict[str, float]) -> float:
        """Seconds exploring `config` is expected to cost: its steps' loss against `best`, if it
        is as predicted, and the switches into it and back."""
        step = self.model.step_time(config, batch, context)
        tokens = batch * self.model.acceptance.estimate(config, batch)
        loss = self.explore_steps * max(step - tokens / predicted[best], 0.0)
        return loss + self._switch_s(self.current, config, batch) + self._switch_s(config, best, batch)

    def _worth_exploring(self, config: str, best: str, batch: int, cost: float,
                         predicted: dict[str, float]) -> bool:
        """Were its prediction off in its favour by the usual spread, would `config` beat the
        best measured one by the margin, and would that gain, over as much time in this
        bucket as it has run so far, pay for exploring it (its steps' loss, if it is as
        predicted, and the switches into it and back)? Close configs fail the first test
        once predictions prove accurate; dear ones (SD at 64 rows: a switch rebuilds every
        row's features, 40-80 ms on the CPU) fail the second in a bucket that lasts a few
        steps, and pass it only where the bucket keeps coming back."""
        hope = predicted[config] * math.exp(self.spread.value) / predicted[best] - 1 - self.margin
        if hope <= 0:
            return False
        step_best = batch * self.model.acceptance.estimate(best, batch) / predicted[best]
        horizon = max(self.bucket_s[octave(batch)], self.min_dwell * step_best)
        return hope * horizon > cost

    def _hysteresis(self, best: str, predicted: dict[str, float], batch: int,
                    entering: bool) -> tuple[str, str, str]:
        current = self.current
        gain = predicted[best] / max(predicted[current], 1e-12) - 1
        needed = self.margin + self.confidence * self._noise(current, best, batch)
        if best == current or gain <= needed:
            self.pending, self.streak = None, 0
            if best == current:
                return "keep", current, f"keep {current}: fastest at batch {batch}"
            return "keep", current, f"keep {current}: {best} only {gain:+.1%} at batch {batch} (needs {needed:.1%})"
        self.streak = self.streak + 1 if self.pending == best else 1
        self.pending = best
        if self.streak < self.patience and not entering:
            return "keep", current, f"keep {current}: {best} {gain:+.1%} at batch {batch}, {self.streak}/{self.patience}"
        if self.since_switch < self.min_dwell and not entering:
            return "keep", current, f"keep {current}: {best} {gain:+.1%}, dwell {self.since_switch}/{self.min_dwell}"
        saved, cost = self._saving(current, best, batch, predicted), self._switch_s(current, best, batch)
        if saved <= cost:
            return "keep", current, (f"keep {current}: {best} {gain:+.1%} saves {saved * 1e3:.2f} ms over "
                                     f"{self.min_dwell} steps, a switch costs {cost * 1e3:.2f} ms")
        if entering:
            return "bucket", best, f"switch {current} -> {best}: {gain:+.1%} measured at bucket {octave(batch)} (batch {batch})"
        return "switch", best, f"switch {current} -> {best}: {gain:+.1%} at batch {batch}, {self.streak} decisions agree"

    def _noise(self, current: str, best: str, batch: int) -> float:
        """The standard error of log(best / current) as measured: the bucket's step-time
        noise over the steps each estimate averages. Acceptance is averaged over rows
        (`RowMean`) and left out."""
        sigma = self._sigma(octave(batch))
        steps = [min(self.model.correction.count(c, batch), self._averaged_steps()) for c in (current, best)]
        return sigma * math.sqrt(sum(1 / max(n, 1) for n in steps))

    def _saving(self, current: str, best: str, batch: int, predicted: dict[str, float]) -> float:
        """Seconds saved by emitting min_dwell steps' worth of `best`'s tokens with it, not `current`."""
        tokens = max(self.min_dwell, 1) * batch * self.model.acceptance.estimate(best, batch)
        return tokens / predicted[current] - tokens / predicted[best]

    def _switch_s(self, source: str | None, into: str, batch: int) -> float:
        """What a switch from `source` into `into` is expected to cost at this batch (measured per row)."""
        kind = _switch_kind(source, into)
        return 0.0 if kind is None else max(self.switch_cost[kind].value, 0.0) * batch

    def _probe(self, batch: int, context: float, predicted: dict[str, float]) -> str:
        """The config to run this step: the current one, or now and then one worth re-measuring."""
        if not self.probe_every or self.decisions % self.probe_every:
            return self.current
        bucket = octave(batch)
        due = [c for c in predicted if c != self.current
               and self.decisions - self.last_run.get((c, bucket), -self.probe_every) >= self.probe_every]
        step = self.model.step_time(self.current, batch, context)
        costs = {c: self.model.step_time(c, batch, context) - step + self._switch_s(self.current, c, batch)
                 + self._switch_s(c, self.current, batch) for c in due}
        budget, left = self.probe_budget * self.probe_every * step, self._visit_left(step)
        probe = max((c for c in due if costs[c] <= min(budget, left)), key=predicted.get, default=self.current)
        if probe != self.current:
            self.visit_spent += max(costs[probe], 0.0)
        return probe


def _switch_kind(source: str | None, into: str) -> str | None:
    """Which measured switch cost a step of `into` after `source` pays: "sd" from plain
    decoding into SD (every row's drafter features rebuilt), "nosd" from SD into plain
    decoding, none between SD shapes (the features and the head's cache carry over) or
    without a change. Before, a change of shape counted as a switch into SD, and its ~0
    excess halved the measured cost of a real one."""
    if source is None or source == into or (source != NOSD and into != NOSD):
        return None
    return _kind(into)
