"""Drafters: what proposes the draft tree of each speculative step (see base.Drafter)."""

from respec.engine.drafters.base import (
    AcceptanceRule,
    Drafter,
    DraftProposal,
    DraftRequest,
    DraftShape,
)
from respec.engine.drafters.ngram import NgramDrafter

__all__ = [
    "AcceptanceRule",
    "DraftProposal",
    "DraftRequest",
    "DraftShape",
    "Drafter",
    "NgramDrafter",
]
