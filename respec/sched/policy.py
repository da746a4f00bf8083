"""The Scheduler's decision rule, free of any runtime: the actor and `respec bench adaptive`
run this same code.

Each decision predicts accepted tokens/s of plain decoding and of every candidate shape
for the live batch and context, and picks the fastest, with hysteresis: it leaves the
current config only when the best one is predicted faster by more than `margin`
(relative), and only after `patience` consecutive decisions agree on that same best.
Noise in the live timings then moves the predictions a few percent without flapping,
while a real change (the batch halves as rows finish) switches within `patience` steps.

Probes: the live refresh only sees the config that runs, so a config the profile got
wrong (too slow) would never be tried again. Every `probe_every` decisions, one config
predicted within `probe_within` of the current one and not run for `probe_every`
decisions runs for a single step (reason "probe"); its timing then corrects its own
estimate. Plain decoding is always eligible, whatever its prediction: it is the
baseline SD must beat, and the one config whose mistake costs most to keep. The price
is bounded: one step in `probe_every`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from respec.engine.drafters.base import DraftShape
from respec.sched.cost_model import CostModel
from respec.sched.profile import NOSD


@dataclass(frozen=True)
class Decision:
    config: str  # "nosd" or "s{s}_t{t}_n{n}"
    switched: bool  # differs from the previous decision's config
    batch: int
    predicted: dict[str, float] = field(default_factory=dict)  # config -> tokens/s
    reason: str = ""

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


class SchedulerPolicy:
    def __init__(self, model: CostModel, candidates: list[str] | tuple[str, ...], margin: float = 0.05,
                 patience: int = 2, initial: str | None = None, probe_every: int = 20,
                 probe_within: float = 0.2) -> None:
        if probe_every < 0 or not 0 <= probe_within < 1:
            raise ValueError(f"probe_every must be >= 0 (0: never) and probe_within in [0, 1), got "
                             f"{probe_every} and {probe_within}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0 (a relative gain), got {margin}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1 decision, got {patience}")
        self.model = model
        self.configs = check_candidates([NOSD, *candidates])
        self.margin, self.patience = margin, patience
        self.current = initial
        self.pending, self.streak = None, 0
        self.probe_every, self.probe_within = probe_every, probe_within
        self.decisions = 0
        self.last_run: dict[str, int] = {}  # config -> the decision count when it last ran
        self.last_config: str | None = None  # what the last decision told to run (a probe, maybe)

    def observe(self, config: str, batch: float, context: float, step_s: float, accept_len: float) -> None:
        self.model.observe(config, batch, context, step_s, accept_len)
        self.last_run[config] = self.decisions

    def decide(self, batch: int, context: float) -> Decision:
        predicted = {c: self.model.tokens_per_s(c, max(batch, 1), context) for c in self.configs}
        best = max(predicted, key=predicted.get)
        previous = self.current
        if previous is None or previous not in predicted:
            self.current, self.pending, self.streak = best, None, 0
            reason = f"start: {best} fastest at batch {batch}"
        else:
            reason = self._hysteresis(best, predicted, batch)
        self.decisions += 1
        config = self._probe(predicted)
        if config != self.current:
            reason = f"probe {config} for one step ({reason})"
        switched, self.last_config = config != self.last_config, config
        return Decision(config, switched, batch, {c: round(v, 2) for c, v in predicted.items()}, reason)

    def _probe(self, predicted: dict[str, float]) -> str:
        """The config to run this step: the current one, or now and then one worth re-measuring."""
        if not self.probe_every or self.decisions % self.probe_every:
            return self.current
        floor = (1 - self.probe_within) * predicted[self.current]
        unseen = [c for c in predicted if c != self.current and (predicted[c] >= floor or c == NOSD)
                  and self.decisions - self.last_run.get(c, -self.probe_every) >= self.probe_every]
        return max(unseen, key=predicted.get, default=self.current)

    def _hysteresis(self, best: str, predicted: dict[str, float], batch: int) -> str:
        """Count consecutive decisions whose best beats the current config by the margin."""
        current = self.current
        gain = predicted[best] / max(predicted[current], 1e-12) - 1
        if best == current or gain <= self.margin:
            self.pending, self.streak = None, 0
            if best == current:
                return f"keep {current}: fastest at batch {batch}"
            return f"keep {current}: {best} only {gain:+.1%} at batch {batch} (margin {self.margin:.0%})"
        self.streak = self.streak + 1 if self.pending == best else 1
        self.pending = best
        if self.streak < self.patience:
            return f"keep {current}: {best} {gain:+.1%} at batch {batch}, {self.streak}/{self.patience} decisions"
        self.current, self.pending, streak, self.streak = best, None, self.streak, 0
        return f"switch {current} -> {best}: {gain:+.1%} at batch {batch}, {streak} decisions agree"
