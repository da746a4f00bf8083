"""The Scheduler's decision rule, free of any runtime: the actor and `respec bench adaptive`
run this same code.

Each decision predicts accepted tokens/s of plain decoding and of every candidate shape
for the live batch and context (cost_model.py). What it does with them is built for a
live RL run, where the batch changes every step and single step timings are noisy:

- **Per bucket, measured.** Everything is learned and compared per batch octave (the
  bucket: 6-11 rows, 12-22, ...). A config's prediction in a bucket is only trusted once
  it has run `explore_steps` steps there (its own live correction); before that it is
  explored. Explored in each bucket, once: plain decoding (always: the baseline SD must
  beat, so SD is chosen only where it measured faster than plain decoding *in this
  bucket*), and every SD shape predicted within `probe_within` of the best measured one.
  The cost is bounded (a few steps per config per bucket) and paid once per run.
- **Hysteresis** among measured configs: leave the current one only for a predicted gain
  above `margin`, and only if the time the gain saves over `min_dwell` steps exceeds what
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
"""

from __future__ import annotations

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


def _kind(config: str) -> str:
    return "nosd" if config == NOSD else "sd"


class SchedulerPolicy:
    def __init__(self, model: CostModel, candidates: list[str] | tuple[str, ...], margin: float = 0.05,
                 patience: int = 2, initial: str | None = None, probe_every: int = 50,
                 probe_within: float = 0.2, min_dwell: int = 8, explore_steps: int = 3,
                 switch_cost_s: float = 0.0, probe_budget: float = 0.03) -> None:
        if probe_every < 0 or not 0 <= probe_within < 1 or probe_budget < 0:
            raise ValueError(f"probe_every must be >= 0 (0: never), probe_within in [0, 1) and probe_budget >= 0, "
                             f"got {probe_every}, {probe_within} and {probe_budget}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0 (a relative gain), got {margin}")
        if patience < 1 or min_dwell < 0 or explore_steps < 1:
            raise ValueError(f"patience must be >= 1 decision, min_dwell >= 0, explore_steps >= 1; got "
                             f"{patience}, {min_dwell}, {explore_steps}")
        self.model = model
        self.configs = check_candidates([NOSD, *candidates])
        self.margin, self.patience, self.min_dwell, self.explore_steps = margin, patience, min_dwell, explore_steps
        self.probe_every, self.probe_within, self.probe_budget = probe_every, probe_within, probe_budget
        self.current = initial
        self.pending, self.streak = None, 0
        self.decisions = self.since_switch = 0
        self.bucket: int | None = None  # the batch bucket of the last decision
        self.settled: set[int] = set()  # buckets whose exploration is over and acted on
        self.last_run: dict[tuple[str, int], int] = {}  # (config, bucket) -> decision count when it last ran
        self.last_config: str | None = None  # what the last decision told to run (a probe, maybe)
        self.last_observed: str | None = None  # the config of the last step observed
        # seconds per row in the step: a switch into SD rebuilds every row's drafter features
        self.switch_cost = {k: Ema(0.2, seed=switch_cost_s, seed_counts=False) for k in ("nosd", "sd")}
        self.kinds: Counter[str] = Counter()  # decisions by kind, for the trace and benches

    # ------------------------------------------------------------------ learning

    def observe(self, config: str, batch: float, context: float, step_s: float, accept_len: float) -> None:
        """A live step of `config`; the first after a switch also measures the switch cost."""
        if self.last_observed is not None and config != self.last_observed and batch >= 1:
            cost = self.switch_cost[_kind(config)]
            if self.measured(config, batch):  # else its prediction's own error would pass for a switch cost
                excess = step_s - self.model.step_time(config, batch, context)
                cost.add(min(excess, step_s) / batch)  # unclipped below: noise either way averages out
            if not cost.count:  # a switch step, cost unknown: its time says nothing clean about the config
                step_s = 0.0
            step_s -= min(max(cost.value, 0.0) * batch, 0.5 * step_s)  # what the step costs without the switch
        self.last_observed = config
        if step_s > 0:
            self.model.observe(config, batch, context, step_s, accept_len)
        else:
            self.model.acceptance.observe(config, accept_len, batch)
        self.last_run[(config, octave(batch))] = self.decisions

    def measured(self, config: str, batch: float) -> bool:
        return self.model.correction.count(config, batch) >= self.explore_steps

    # ------------------------------------------------------------------ deciding

    def decide(self, batch: int, context: float) -> Decision:
        batch = max(batch, 1)
        predicted = {c: self.model.tokens_per_s(c, batch, context) for c in self.configs}
        self.decisions += 1
        self.since_switch += 1
        entering, self.bucket = octave(batch) != self.bucket, octave(batch)
        if self.current is None or self.current not in predicted:
            kind, target = "start", max(predicted, key=predicted.get)
            reason = f"start: {target} fastest at batch {batch}"
        else:
            kind, target, reason = self._choose(batch, predicted, entering)
        if target != self.current:
            self.current, self.since_switch, self.pending, self.streak = target, 0, None, 0
        config = self._probe(batch, context, predicted)
        if config != self.current:
            kind, reason = "probe", f"probe {config} for one step ({reason})"
        self.kinds[kind] += 1
        switched, self.last_config = config != self.last_config, config
        return Decision(config, switched, batch, predicted, reason, kind)

    def _choose(self, batch: int, predicted: dict[str, float], entering: bool) -> tuple[str, str, str]:
        """(kind, config to run, reason)."""
        measured = [c for c in self.configs if self.measured(c, batch)]
        explore = self._to_explore(batch, predicted, measured)
        if explore:
            self.settled.discard(self.bucket)
            target = self.current if self.current in explore else explore[0]
            verb = "exploring" if target == self.current else f"explore {target}:"
            return "explore", target, (f"{verb} {self.model.correction.count(target, batch)}/{self.explore_steps} "
                                       f"steps measured at bucket {octave(batch)} (batch {batch})")
        best = max(measured, key=predicted.get)
        if self.current not in measured or self.bucket not in self.settled:  # exploration over: go by what it measured
            self.settled.add(self.bucket)
            return "settle", best, f"settle on {best}: fastest measured at bucket {octave(batch)} (batch {batch})"
        return self._hysteresis(best, predicted, batch, entering)

    def _to_explore(self, batch: int, predicted: dict[str, float], measured: list[str]) -> list[str]:
        """Configs to measure in this bucket: plain decoding, and SD shapes predicted within
        probe_within of the best measured config (of the best prediction, before any)."""
        reference = max((predicted[c] for c in measured), default=max(predicted.values()))
        floor = (1 - self.probe_within) * reference
        wanted = [c for c in self.configs if c not in measured and (c == NOSD or predicted[c] >= floor)]
        return sorted(wanted, key=lambda c: (c != NOSD, -predicted[c]))

    def _hysteresis(self, best: str, predicted: dict[str, float], batch: int,
                    entering: bool) -> tuple[str, str, str]:
        current = self.current
        gain = predicted[best] / max(predicted[current], 1e-12) - 1
        if best == current or gain <= self.margin:
            self.pending, self.streak = None, 0
            if best == current:
                return "keep", current, f"keep {current}: fastest at batch {batch}"
            return "keep", current, f"keep {current}: {best} only {gain:+.1%} at batch {batch} (margin {self.margin:.0%})"
        self.streak = self.streak + 1 if self.pending == best else 1
        self.pending = best
        if self.streak < self.patience and not entering:
            return "keep", current, f"keep {current}: {best} {gain:+.1%} at batch {batch}, {self.streak}/{self.patience}"
        if self.since_switch < self.min_dwell and not entering:
            return "keep", current, f"keep {current}: {best} {gain:+.1%}, dwell {self.since_switch}/{self.min_dwell}"
        saved, cost = self._saving(current, best, batch, predicted), self._switch_s(best, batch)
        if saved <= cost:
            return "keep", current, (f"keep {current}: {best} {gain:+.1%} saves {saved * 1e3:.2f} ms over "
                                     f"{self.min_dwell} steps, a switch costs {cost * 1e3:.2f} ms")
        if entering:
            return "bucket", best, f"switch {current} -> {best}: {gain:+.1%} measured at bucket {octave(batch)} (batch {batch})"
        return "switch", best, f"switch {current} -> {best}: {gain:+.1%} at batch {batch}, {self.streak} decisions agree"

    def _saving(self, current: str, best: str, batch: int, predicted: dict[str, float]) -> float:
        """Seconds saved by emitting min_dwell steps' worth of `best`'s tokens with it, not `current`."""
        tokens = max(self.min_dwell, 1) * batch * self.model.acceptance.estimate(best, batch)
        return tokens / predicted[current] - tokens / predicted[best]

    def _switch_s(self, into: str, batch: int) -> float:
        """What a switch into `into` is expected to cost at this batch (measured per row)."""
        return max(self.switch_cost[_kind(into)].value, 0.0) * batch

    def _probe(self, batch: int, context: float, predicted: dict[str, float]) -> str:
        """The config to run this step: the current one, or now and then one worth re-measuring."""
        if not self.probe_every or self.decisions % self.probe_every:
            return self.current
        bucket = octave(batch)
        due = [c for c in predicted if c != self.current
               and self.decisions - self.last_run.get((c, bucket), -self.probe_every) >= self.probe_every]
        step = self.model.step_time(self.current, batch, context)
        budget = self.probe_budget * self.probe_every * step
        affordable = [c for c in due if self.model.step_time(c, batch, context) - step
                      + self._switch_s(c, batch) + self._switch_s(self.current, batch) <= budget]
        return max(affordable, key=predicted.get, default=self.current)
