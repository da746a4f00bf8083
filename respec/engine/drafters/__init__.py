"""Drafters: what proposes the draft tree of each speculative step (see base.Drafter)."""

from respec.engine.drafters.base import (
    AcceptanceRule,
    Drafter,
    DraftProposal,
    DraftRequest,
    DraftShape,
)
from respec.engine.drafters.draft_model import DraftModelDrafter
from respec.engine.drafters.eagle import EagleDrafter, EagleHead, distill_loss, layers_to_capture
from respec.engine.drafters.ngram import NgramDrafter

__all__ = [
    "AcceptanceRule",
    "DraftProposal",
    "DraftRequest",
    "DraftShape",
    "DraftModelDrafter",
    "Drafter",
    "EagleDrafter",
    "EagleHead",
    "NgramDrafter",
    "distill_loss",
    "layers_to_capture",
]
