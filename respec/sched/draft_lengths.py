"""The draft length per batch bucket for the fast path (EAGLE chains of k drafts; k = 0 is
plain decoding): the Scheduler's rule (docs/SCHEDULER.md) on a profile of the fast path's
own step costs, with the per-draft acceptance rate learnt from the run's rollouts.
FastRollouts (`adaptive`) and bench/gpu_rl.py decide with it."""

from __future__ import annotations

from respec.engine.drafters.base import DraftShape
from respec.sched.cost_model import geometric_accept_len
from respec.sched.profile import NOSD


def choose_draft_lengths(step_cost: dict[tuple[int, int], float], accepted: dict[int, float]) -> dict[int, int]:
    """The Scheduler's rule (docs/SCHEDULER.md): per batch bucket, the draft length that
    maximises expected tokens per second, (1 + accepted drafts per step) / step seconds,
    from a profile of step costs and acceptance measured on other prompts."""
    buckets = sorted({b for b, _ in step_cost})
    choice = {}
    for b in buckets:
        rates = {k: (1 + accepted.get(k, 0.0)) / seconds for (bb, k), seconds in step_cost.items() if bb == b}
        choice[b] = max(rates, key=rates.get)
    return choice


def chain_acceptance(chains: dict[int, int], accepted: int) -> float:
    """The per-draft acceptance rate a that explains `accepted` drafts over `chains` (draft
    length -> chains drafted): a chain of k accepts a + a^2 + ... + a^k drafts in expectation
    (each draft accepted with probability a, given its predecessors were). Bisection."""
    def expected(a: float) -> float:
        per_chain = accepted_per_chain(a, chains)
        return sum(n * per_chain[k] for k, n in chains.items())

    if expected(1.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) < accepted else (low, mid)
    return (low + high) / 2


def accepted_per_chain(rate: float, lengths) -> dict[int, float]:
    """Expected accepted drafts per step for each draft length, at acceptance rate `rate`:
    the Scheduler's geometric model (a chain of k accepts rate + ... + rate^k), less the
    bonus token it counts."""
    return {k: geometric_accept_len(DraftShape.chain(k).name if k else NOSD, rate) - 1 for k in lengths}


class LiveChoice:
    """The scheduler of the RL runs: per batch bucket, the draft length with the most
    expected tokens per second, from the profile's step costs and the acceptance rate of
    the run's own rollouts (an average over the latest generations, so a head that goes
    stale, or a distillation that refreshes it, moves the choice within a step or two).
    The profile's acceptance, measured on other prompts before RL, only seeds it."""

    def __init__(self, step_cost: dict[tuple[int, int], float], rate: float, memory: float = 0.5) -> None:
        self.step_cost, self.rate, self.memory = step_cost, rate, memory
        self.lengths = sorted({k for _, k in step_cost})
        self.choice = self._choose()

    @staticmethod
    def from_profile(profile: dict, rows: int) -> LiveChoice:
        cost = {(int(b), int(k)): seconds for key, seconds in profile["step_s"].items()
                for b, k in [key.split("/")] if int(b) <= rows}
        if rows not in {b for b, _ in cost}:
            raise ValueError(f"the profile has no step costs for a batch of {rows} rows")
        seeded = {int(k): a for k, a in profile["accepted_per_step"].items()}
        return LiveChoice(cost, chain_acceptance({k: 1 for k in seeded}, sum(seeded.values())))

    def observe(self, chains: dict[int, int], accepted: int) -> None:
        if any(k for k in chains):
            self.rate = self.memory * self.rate + (1 - self.memory) * chain_acceptance(chains, accepted)
            self.choice = self._choose()

    def expect(self, rate: float) -> None:
        """Decide from this acceptance rate until rollouts say otherwise (a new head, whose
        own rate is unknown: a low rate left from a stale one would keep drafting off at
        every bucket where the new head would pay, and with drafting off nothing is
        observed)."""
        self.rate = rate
        self.choice = self._choose()

    def new_head(self, explore: float) -> None:
        """A new head: its rate is the live one (a distillation update is a small step: on two
        H100s held-out acceptance before and after each of 32 updates agreed to 0.02, a4e6835),
        unless that rate keeps drafting off at every bucket, where nothing would be observed;
        then `explore`, or the live rate if higher. Until 504160d every new head reset the rate
        to the prior, which chose lengths for a higher acceptance than early-run rollouts had
        (no step-time effect was measurable in those batches)."""
        if not any(self.choice.values()):
            self.expect(max(self.rate, explore))

    def _choose(self) -> dict[int, int]:
        return choose_draft_lengths(self.step_cost, accepted_per_chain(self.rate, self.lengths))
