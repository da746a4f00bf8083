"""Step cost and acceptance models: predicted accepted tokens per second per config.

    tokens/s (config, B, L) = B * E[accepted + 1 | config] / step_time(config, B, L)

Step time. From a profile: per config, piecewise-linear interpolation over the measured
grid, in log(step time) against log2(batch) at each profiled context, then linear in
context between the two nearest profiled contexts. Beyond the largest profiled batch it
extrapolates linearly in batch (the compute-bound regime is linear), below the smallest
it holds the smallest's value. Why not one least-squares formula: step time against
batch is flat while the device is memory-bound and linear once it is compute-bound, and
a low-order polynomial misses that knee by tens of percent, which is exactly where SD
stops paying; the grid is cheap to measure densely, so the data is the model.
Without a profile a rough prior (`PriorCost`) stands in: target cost 1 + (T/T0)^p for T
tokens verified per step, fitted to the verify-8 / decode-1 cost ratios measured for this
project (1.4x at batch 1, 3.7x at batch 64), plus drafting at a fixed fraction of a
target step per drafting level.

Online refresh (`OnlineCorrection`): every live step timing updates an EMA of
log(observed / predicted), kept per (config, batch octave), per (SD, batch octave) for the
SD shapes, per batch octave, per config and overall; a prediction is multiplied by the
most specific one seen. A foreign or
stale profile therefore converges to the live timings of what runs, an error common to
all configs carries over to those not running, and an error of one config alone is found
by the decision rule's occasional probes.

Acceptance (`AcceptanceEstimate`): E[accepted + 1] per config, an EMA of the live values
while that config runs (per batch bucket: a mean over its last rows, `RowMean`); for a
config not seen lately, its prior (profile-measured or a geometric model) scaled by the
live drift, the EMA of (observed - 1) / (prior - 1) over
what did run. A drafter that goes stale lowers every SD config's estimate at once.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable

from respec.engine.drafters.base import DraftShape
from respec.sched.profile import NOSD, Profile, ProfilePoint

# PriorCost's target curve (fit described above) and drafting cost per level
PRIOR_T0, PRIOR_POWER, PRIOR_DRAFT_FRACTION = 19.9, 0.72, 0.15
PRIOR_ALPHA = 0.5  # per-token acceptance assumed before anything is measured
CONTEXT_STEP = 4  # contexts closer than this share a memoised step time
SD_KIND = "sd"  # the correction level every SD shape shares (per bucket)


def verified_tokens(config: str) -> int:
    """Tokens the target runs per row per step: the root plus the draft nodes."""
    return 1 if config == NOSD else DraftShape.parse(config).num_draft + 1


class ProfileCost:
    """Step time per (config, batch, context), interpolated over a profile's grid."""

    def __init__(self, points: Iterable[ProfilePoint]) -> None:
        # config -> context -> (log2 batches, log step times), ascending in batch; plain lists:
        # numpy's per-call overhead on 7 numbers costs more than the arithmetic
        self.table: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
        # (config, batch, context to CONTEXT_STEP tokens) -> seconds: the Scheduler asks the
        # same few questions every step, and a step at batch 1 is a few ms on the CPU
        self.memo: dict[tuple[str, float, int], float] = {}
        grouped: dict[str, dict[int, list[tuple[int, float]]]] = {}
        for p in points:
            grouped.setdefault(p.config, {}).setdefault(p.context, []).append((p.batch, p.step_s))
        for config, by_context in grouped.items():
            self.table[config] = {}
            for context, pairs in by_context.items():
                pairs.sort()
                self.table[config][context] = ([math.log2(b) for b, _ in pairs], [math.log(t) for _, t in pairs])

    @classmethod
    def from_profile(cls, profile: Profile) -> ProfileCost:
        return cls(profile.points)

    @property
    def configs(self) -> list[str]:
        return sorted(self.table)

    def predict(self, config: str, batch: float, context: float) -> float:
        key = (config, batch, CONTEXT_STEP * round(context / CONTEXT_STEP))
        if key not in self.memo:
            self.memo[key] = self._interpolate(config, batch, key[2])
        return self.memo[key]

    def _interpolate(self, config: str, batch: float, context: float) -> float:
        if config not in self.table:
            raise KeyError(f"config {config!r} is not in the profile (it has {', '.join(self.configs)})")
        by_context = self.table[config]
        contexts = sorted(by_context)
        if len(contexts) == 1 or context <= contexts[0]:
            return _in_batch(*by_context[contexts[0]], batch)
        i = min(bisect.bisect_left(contexts, context), len(contexts) - 1)  # the bracket's upper end
        lo, hi = contexts[i - 1], contexts[i]
        t_lo, t_hi = _in_batch(*by_context[lo], batch), _in_batch(*by_context[hi], batch)
        slope = max((t_hi - t_lo) / (hi - lo), 0.0)  # a longer context never makes a step cheaper
        return t_lo + slope * (context - lo)


def _in_batch(log_batches: list[float], log_times: list[float], batch: float) -> float:
    x = math.log2(batch) if batch > 0 else -math.inf
    if x <= log_batches[0]:
        return math.exp(log_times[0])
    if len(log_batches) == 1:  # one measured batch: assume compute-bound above it
        return math.exp(log_times[0]) * batch / 2 ** log_batches[0]
    if x >= log_batches[-1]:  # linear in batch past the grid
        (b0, b1), (t0, t1) = (2 ** v for v in log_batches[-2:]), (math.exp(v) for v in log_times[-2:])
        return t1 + max((t1 - t0) / (b1 - b0), 0.0) * (batch - b1)
    i = bisect.bisect_right(log_batches, x)
    share = (x - log_batches[i - 1]) / (log_batches[i] - log_batches[i - 1])
    return math.exp(log_times[i - 1] + share * (log_times[i] - log_times[i - 1]))


class PriorCost:
    """A rough device-independent shape (relative units), for runs without a profile."""

    def __init__(self, draft_fraction: float = PRIOR_DRAFT_FRACTION) -> None:
        self.draft_fraction = draft_fraction

    def predict(self, config: str, batch: float, context: float) -> float:
        batch = max(batch, 1.0)
        target = self._target(batch * verified_tokens(config)) * (1.0 + context / 4096)
        if config == NOSD:
            return target
        shape = DraftShape.parse(config)
        return target + shape.steps * self.draft_fraction * self._target(batch * shape.branch)

    @staticmethod
    def _target(tokens: float) -> float:
        return 1e-3 * (1.0 + (tokens / PRIOR_T0) ** PRIOR_POWER)


class Ema:
    """A running mean over the first 1/weight values, an exponential moving average after:
    the first few observations (a probe's) count fully, later ones with `weight`. A seed
    counts as one observation (so one noisy step cannot overwrite what was believed)
    unless `seed_counts` is False: then it is only the value before the first observation."""

    def __init__(self, weight: float, seed: float | None = None, seed_counts: bool = True) -> None:
        self.weight, self.value = weight, seed or 0.0
        self.count = int(seed is not None and seed_counts)

    def add(self, value: float) -> None:
        share = max(self.weight, 1 / (self.count + 1))
        self.value = (1 - share) * self.value + share * value
        self.count += 1


class OnlineCorrection:
    """log(observed / predicted) step time, seeded at 0 (trust the profile until steps say
    otherwise), kept per (config, batch octave), per (SD, batch octave) for the SD shapes,
    per batch octave, per config and overall;
    a prediction takes the most specific one seen. A config not run at this batch size
    takes what the configs that did run here learned: what a live rollout adds to a
    profile's clean steps (rows admitted and prefilled, scattered cache slots) depends
    much more on the batch than on the config, and a config's error learned at batch 2
    says little about batch 8. A level seen for the first time starts from that belief;
    the (config, octave) level, though, does not count that seed as an observation: it is
    what the Scheduler compares configs on once each has run a few steps at this octave
    (`count`), and an inherited seed would bias it toward the configs that ran before (a
    plain-decoding step inherited SD's larger live overhead and looked slower than it was).
    Each observation is clipped to +-CLIP around the current value: a step that another
    process stalled 3x must not swing a decision."""

    CLIP = 0.7  # log units: an observation counts as at most 2x off the current estimate

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.emas: dict[tuple, Ema] = {}

    def observe(self, config: str, batch: float, observed_s: float, predicted_s: float) -> None:
        if observed_s <= 0 or predicted_s <= 0:
            return
        ratio = math.log(observed_s / predicted_s)
        believed = math.log(self.factor(config, batch))  # a new level starts from the current belief
        for level, key in enumerate(self._keys(config, batch)):
            ema = self.emas.get(key)
            if ema is None:  # not setdefault: that builds an Ema every step, ~5% of a decision
                ema = self.emas[key] = Ema(self.weight, seed=believed, seed_counts=level > 0)
            ema.add(min(max(ratio, ema.value - self.CLIP), ema.value + self.CLIP))

    def count(self, config: str, batch: float) -> int:
        """Live steps of `config` seen at this batch octave: how much its estimate there is its own."""
        ema = self.emas.get(self._keys(config, batch)[0])
        return ema.count if ema else 0

    def factor(self, config: str, batch: float) -> float:
        for key in self._keys(config, batch):
            if key in self.emas:
                return math.exp(self.emas[key].value)
        return 1.0

    @staticmethod
    def _keys(config: str, batch: float) -> tuple[tuple, ...]:
        bucket = octave(batch)
        if config == NOSD:
            return (config, bucket), (bucket,), (config,), ()
        # An SD shape not run here inherits what the SD shapes that ran here learned before
        # what plain decoding did: on the quiet host a live SD step at 2 rows cost 1.2x its
        # profiled time and a plain one 0.96x (drafting, tree verification, a row's rebuild),
        # and with only the per-bucket level every SD shape looked 25% better than it ran.
        return (config, bucket), (SD_KIND, bucket), (bucket,), (config,), ()


@functools.lru_cache(maxsize=4096)  # asked ~20 times per decision, for a handful of batch sizes
def octave(batch: float) -> int:
    """The batch bucket the Scheduler decides and learns per: round(log2 batch), so 6-11
    rows are bucket 3, 12-22 bucket 4, 23-45 bucket 5."""
    return round(math.log2(max(batch, 1)))


def geometric_accept_len(config: str, alpha: float) -> float:
    """E[accepted + 1] if each level is accepted with probability alpha for one candidate,
    1 - (1 - alpha)^t for t siblings, and the tree reaches depth min(s, n // t)."""
    if config == NOSD:
        return 1.0
    shape = DraftShape.parse(config)
    level = 1 - (1 - alpha) ** shape.branch
    depth = min(shape.steps, max(shape.num_draft // shape.branch, 1))
    return sum(level**i for i in range(depth + 1))


class RowMean:
    """A mean of per-row values over the last ~`memory` rows: a step's value counts by the
    rows it averaged. One step at 1 row is one draw of a row's acceptance (1 to n + 1
    tokens, +-40% around the mean); one at 64 rows is the mean of 64. A per-step EMA let
    one row's luck at 1-2 rows swing a bucket's estimate by 20-50% (an s6 step that accepted
    nothing made it look useless, one that accepted 7 made it the best), and the rule
    switched among shapes a few percent apart on it. Starts at a seed worth `seed_rows`
    rows (what is believed elsewhere), so the first rows refine it instead of replacing it."""

    def __init__(self, memory: float, seed: float, seed_rows: float) -> None:
        self.memory, self.value, self.rows = memory, seed, seed_rows

    def add(self, value: float, rows: float) -> None:
        share = rows / (min(self.rows, self.memory) + rows)  # a running mean, then a memory of ~memory rows
        self.value += share * (value - self.value)
        self.rows += rows


class AcceptanceEstimate:
    """E[accepted + 1 | config], live where measured, prior x drift elsewhere.

    Kept per (config, batch bucket) too, and that one is preferred where it is fresh: which
    rows are left in a bucket is itself a workload (a rollout's tail is its few longest rows,
    which draft past their answer at 1.5-2.3 tokens per step where a full batch of fresh
    prompts gets 2.3-3.4), and one acceptance for every bucket made the tail's small
    buckets decide with what the large ones measured. A bucket's value is a `RowMean` over
    its last `bucket_rows` rows, started from the config's overall value (worth `seed_rows`
    rows). Fresh means seen within `bucket_memory` steps of any config (plain ones
    included): a few rollouts' tails, so the next tail finds the last one's value, but not
    what a long phase of other work measured there (the next observation then starts the
    bucket over from the overall value, which stands in until then)."""

    def __init__(self, prior: dict[str, float], weight: float = 0.2, stale_after: int = 50,
                 bucket_memory: int = 200, bucket_rows: float = 64, seed_rows: float = 8) -> None:
        self.prior = dict(prior)
        self.weight, self.stale_after, self.bucket_memory = weight, stale_after, bucket_memory
        self.bucket_rows, self.seed_rows = bucket_rows, seed_rows
        self.own: dict[str, Ema] = {}
        self.last_seen: dict[str, int] = {}
        self.by_bucket: dict[tuple[str, int], RowMean] = {}
        self.bucket_seen: dict[tuple[str, int], int] = {}
        self.drift = Ema(weight, seed=1.0)
        self.observations = 0  # SD steps
        self.steps = 0  # every step: the clock of the per-bucket values

    def observe(self, config: str, accept_len: float, batch: float | None = None) -> None:
        self.steps += 1
        if config == NOSD or not math.isfinite(accept_len) or accept_len < 1.0:
            return
        if batch is not None:  # before the overall value moves: it seeds a bucket (re)started now
            key = (config, octave(batch))
            if not self._bucket_fresh(key):  # what it held was another phase's: start over
                self.by_bucket[key] = RowMean(self.bucket_rows, self.estimate(config), self.seed_rows)
            self.by_bucket[key].add(accept_len, max(batch, 1.0))
            self.bucket_seen[key] = self.steps
        if config not in self.own:  # seeded with what was believed: one step is a noisy sample
            self.own[config] = Ema(self.weight, seed=self.estimate(config))
        self.observations += 1
        self.own[config].add(accept_len)
        self.last_seen[config] = self.observations
        prior = self.prior.get(config, 1.0)
        if prior > 1.01:
            self.drift.add((accept_len - 1) / (prior - 1))

    def estimate(self, config: str, batch: float | None = None) -> float:
        if config == NOSD:
            return 1.0
        key = None if batch is None else (config, octave(batch))
        if key is not None and self._bucket_fresh(key):
            return self.by_bucket[key].value
        if config in self.own and self.observations - self.last_seen[config] < self.stale_after:
            return self.own[config].value
        drift = self.drift.value if self.drift.count else 1.0
        return 1.0 + (self.prior.get(config, 1.0) - 1.0) * drift

    def _bucket_fresh(self, key: tuple[str, int]) -> bool:
        seen = self.bucket_seen.get(key)
        return seen is not None and self.steps - seen < self.bucket_memory


class CostModel:
    """Predicted step time and accepted tokens/s per config, refreshed from live steps."""

    def __init__(self, base: ProfileCost | PriorCost, acceptance: AcceptanceEstimate,
                 correction: OnlineCorrection | None = None) -> None:
        self.base, self.acceptance = base, acceptance
        self.correction = correction or OnlineCorrection()

    @classmethod
    def build(cls, configs: Iterable[str], profile: Profile | None = None, ema: float = 0.2,
              stale_after: int = 50) -> CostModel:
        """From a profile when given (its measured acceptance as the prior), else the prior."""
        configs = list(configs)
        prior = {c: geometric_accept_len(c, PRIOR_ALPHA) for c in configs}
        if profile is None:
            return cls(PriorCost(), AcceptanceEstimate(prior, ema, stale_after), OnlineCorrection(ema))
        base = ProfileCost.from_profile(profile)
        missing = [c for c in [NOSD, *configs] if c not in base.configs]
        if missing:
            raise ValueError(f"the profile has no timings for {', '.join(missing)} (it has {', '.join(base.configs)})")
        prior.update({c: v for c, v in profile.accept_len.items() if c in prior})
        return cls(base, AcceptanceEstimate(prior, ema, stale_after), OnlineCorrection(ema))

    def step_time(self, config: str, batch: float, context: float) -> float:
        return self.base.predict(config, batch, context) * self.correction.factor(config, batch)

    def tokens_per_s(self, config: str, batch: float, context: float) -> float:
        return batch * self.acceptance.estimate(config, batch) / self.step_time(config, batch, context)

    def observe(self, config: str, batch: float, context: float, step_s: float, accept_len: float) -> None:
        """A live step: its wall time (drafting + verification) and tokens per row."""
        if batch < 1:
            return
        self.correction.observe(config, batch, step_s, self.base.predict(config, batch, context))
        self.acceptance.observe(config, accept_len, batch)
