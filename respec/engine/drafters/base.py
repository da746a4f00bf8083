"""The interface every drafter implements: n-gram lookup, an EAGLE-3 head, a small model.

One speculative step, as the Generator runs it:

    request  = DraftRequest(histories, features, rows, shape)   # what the drafter may look at
    proposal = drafter.propose(request)                         # a DraftTree (+ q if sampled)
    ... the Verifier runs the target over proposal.tree and calls proposal.accept(...)

A drafter sees committed tokens only (prompt + everything accepted so far). Per-row
state (a drafter's own KV cache, say) is keyed by the stable row ids in the request;
the Generator calls ``reset_row`` when a new sequence takes a row id and
``release_row`` when a sequence ends, and ``load_weights`` between steps when the
DraftDistiller publishes new weights.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from respec.engine.acceptance import Acceptance, accept
from respec.engine.tree import DraftTree

AcceptanceRule = Literal["deterministic", "sampled"]

_SHAPE_NAME = re.compile(r"s(\d+)_t(\d+)_n(\d+)")


@dataclass(frozen=True)
class DraftShape:
    """ReSpec's (s, t, n) draft configuration, which the Scheduler picks per batch size.

    steps (s): tree depth, i.e. how many drafting steps run.
    branch (t): children kept per expanded node (top-t); 1 gives a chain.
    num_draft (n): draft nodes verified per row, the tree's width in the verification
        layout. A drafter may fill fewer (the rest is padding) but never more.
    """

    steps: int
    branch: int
    num_draft: int

    def __post_init__(self) -> None:
        for field in ("steps", "branch", "num_draft"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"DraftShape.{field} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"DraftShape.{field} must be >= 1, got {value}")
        if self.num_draft > self.max_nodes:
            raise ValueError(
                f"DraftShape: num_draft={self.num_draft} exceeds the {self.max_nodes} nodes a "
                f"tree of depth {self.steps} with {self.branch} children per node can hold"
            )

    @property
    def max_nodes(self) -> int:
        """Nodes in the full tree: t + t^2 + ... + t^s (s for a chain)."""
        return sum(self.branch**depth for depth in range(1, self.steps + 1))

    @property
    def is_chain(self) -> bool:
        return self.branch == 1

    @property
    def name(self) -> str:
        """The shape as the Scheduler, configs and benchmarks spell it: ``s3_t1_n3``."""
        return f"s{self.steps}_t{self.branch}_n{self.num_draft}"

    @classmethod
    def parse(cls, name: str) -> DraftShape:
        """The inverse of ``name``: ``DraftShape.parse("s4_t2_n6")``."""
        match = _SHAPE_NAME.fullmatch(name.strip())
        if match is None:
            raise ValueError(
                f"DraftShape: {name!r} is not of the form 's<steps>_t<branch>_n<num_draft>'"
            )
        steps, branch, num_draft = (int(group) for group in match.groups())
        return cls(steps, branch, num_draft)

    @classmethod
    def chain(cls, length: int) -> DraftShape:
        """k draft tokens in a line: s = n = k, t = 1."""
        return cls(length, 1, length)


@dataclass
class DraftRequest:
    """What a drafter gets for one speculative step over B rows."""

    # Each row's committed token ids (prompt + accepted so far), long [L_b]; the last
    # one is the root of the draft tree.
    histories: list[Tensor]
    # Target hidden features at each row's last position, [B, ...] (None for drafters
    # that do not need them, see Drafter.needs_features).
    features: Tensor | None
    # Stable id of each row's sequence, for drafters that keep per-row state.
    rows: list[int]
    # The (s, t, n) the Scheduler picked for this step.
    shape: DraftShape

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.histories):
            raise ValueError(
                f"DraftRequest: {len(self.histories)} histories but {len(self.rows)} row ids"
            )
        if self.features is not None and self.features.shape[0] != len(self.histories):
            raise ValueError(
                f"DraftRequest: features have {self.features.shape[0]} rows, "
                f"histories {len(self.histories)}"
            )
        for row, history in zip(self.rows, self.histories, strict=True):
            if history.dim() != 1:
                raise ValueError(
                    f"DraftRequest: history of row {row} must be 1-D, got {tuple(history.shape)}"
                )

    @property
    def batch_size(self) -> int:
        return len(self.histories)

    @property
    def device(self) -> torch.device:
        """Where the proposal's tensors go: the histories' device (CPU for an empty batch)."""
        return self.histories[0].device if self.histories else torch.device("cpu")


@dataclass
class DraftProposal:
    """A drafter's answer: the tree to verify, and how its tokens were chosen."""

    tree: DraftTree
    # None: every node's token is a deterministic function of its context and siblings
    # are distinct (n-gram lookup, top-t of a model) -> the deterministic rule.
    # float [B, n, V]: row i is the distribution node i's token was *sampled from*
    # (the drafter's q at node i's parent) -> the sampled rule.
    draft_probs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.draft_probs is not None:
            b, n = self.tree.tokens.shape
            if self.draft_probs.dim() != 3 or self.draft_probs.shape[:2] != (b, n):
                raise ValueError(
                    f"DraftProposal: draft_probs must be [B={b}, n={n}, V], "
                    f"got {tuple(self.draft_probs.shape)}"
                )

    @property
    def acceptance_rule(self) -> AcceptanceRule:
        """Which lossless rule non-greedy rows must use (greedy rows use argmax either way)."""
        return "deterministic" if self.draft_probs is None else "sampled"

    def accept(
        self,
        target_probs: Tensor,
        greedy: bool | Tensor = False,
        generator: torch.Generator | None = None,
    ) -> Acceptance:
        """Run the rule that keeps this proposal lossless; target_probs is [B, n + 1, V]."""
        return accept(self.tree, target_probs, self.draft_probs, greedy, generator)


class Drafter(ABC):
    """Proposes draft trees. Subclasses implement ``propose``; the hooks default to no-ops."""

    # True when propose() reads request.features, so the Verifier must return them.
    needs_features: ClassVar[bool] = False

    @abstractmethod
    def propose(self, request: DraftRequest) -> DraftProposal:
        """A tree of at most request.shape.num_draft nodes per row, width exactly n.

        A row with nothing worth proposing gets zero nodes: plain decoding for that row.
        """

    def reset_row(self, row_id: int) -> None:  # noqa: B027 (optional hook)
        """A new sequence now owns ``row_id``: forget whatever the previous one left."""

    def release_row(self, row_id: int) -> None:  # noqa: B027 (optional hook)
        """The sequence in ``row_id`` finished: free its state."""

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:  # noqa: B027 (optional hook)
        """Swap in distilled weights (called between steps, never during propose)."""
