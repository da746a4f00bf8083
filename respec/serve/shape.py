"""Which draft shape each serving step runs: the Scheduler's rule, or one fixed shape.

`auto` runs the Scheduler's decision rule (`respec.sched.policy`) on the live batch, as the
Scheduler actor does during RL: plain decoding and each candidate shape are measured per
batch bucket, and the fastest measured one is kept. It starts from the built-in prior or
a `respec profile` JSON. A fixed shape (`s4_t1_n4`) or `nosd` never changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from respec.engine.drafters.base import DraftShape
from respec.sched.cost_model import CostModel
from respec.sched.policy import SchedulerPolicy, check_candidates
from respec.sched.profile import DEFAULT_CONFIGS, NOSD, Profile

AUTO = "auto"


class ShapeChooser(Protocol):
    #: draft nodes a row may need in one step: the KV room reserved at admission
    reserve: int

    def choose(self, batch: int, context: float) -> DraftShape | None: ...

    def observe(self, config: str, batch: int, context: float, step_s: float, accept_len: float) -> None: ...


class FixedShape:
    def __init__(self, shape: DraftShape | None) -> None:
        self.shape = shape
        self.reserve = shape.num_draft if shape else 0

    def choose(self, batch: int, context: float) -> DraftShape | None:
        return self.shape

    def observe(self, config: str, batch: int, context: float, step_s: float, accept_len: float) -> None:
        pass


class ScheduledShape:
    """The Scheduler actor's policy, fed by the serving loop's own step timings."""

    def __init__(self, candidates: tuple[str, ...] = DEFAULT_CONFIGS, profile: Profile | None = None) -> None:
        configs = [c for c in check_candidates(candidates) if c != NOSD]
        self.policy = SchedulerPolicy(CostModel.build(configs, profile), configs)
        self.reserve = max(DraftShape.parse(c).num_draft for c in configs)

    def choose(self, batch: int, context: float) -> DraftShape | None:
        return self.policy.decide(batch, context).shape

    def observe(self, config: str, batch: int, context: float, step_s: float, accept_len: float) -> None:
        self.policy.observe(config, batch, context, step_s, accept_len)


def make_chooser(spec: str, has_drafter: bool, profile: str | Path | None = None) -> ShapeChooser:
    """`auto`, `nosd` or a shape name; ValueError on a name that does not parse, or a
    draft shape (or a profile) without a drafter."""
    spec = spec.strip()
    shape = None if spec in (AUTO, NOSD) else DraftShape.parse(spec)  # a bad name first
    if not has_drafter:
        if spec not in (AUTO, NOSD):
            raise ValueError(f"--shape {spec} needs a drafter (--draft); without one only 'auto' or 'nosd'")
        if profile:
            raise ValueError("--profile is read by the Scheduler's rule, which needs a drafter (--draft)")
        return FixedShape(None)
    if spec == AUTO:
        return ScheduledShape(profile=Profile.load(profile) if profile else None)
    if profile:
        raise ValueError(f"--profile is read by --shape auto only, not by a fixed --shape {spec}")
    return FixedShape(shape)
