"""The rollout engine in one process: rows and drafter on one side, the target on the other.

Every active row carries a *root*: its last sampled token, not yet in the KV cache. One
step drafts a tree (or nothing) per row, lets the target verify all rows in one pass
(`TargetRunner.verify`), and appends the accepted tokens plus the bonus token, which
becomes the next root. Plain decoding is the same step with an empty tree, so SD on and
off differ only in the drafts. The Generator and Verifier actors split exactly along
`RowBook` / `TargetRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from respec.engine.drafters.base import Drafter, DraftRequest, DraftShape
from respec.engine.model import CausalLM
from respec.engine.target import Sampling, TargetRunner, Verified
from respec.engine.tree import DraftTree

__all__ = ["Row", "RowBook", "Sampling", "SpeculativeEngine", "StepStats"]


@dataclass
class Row:
    row_id: int
    slot: int
    prompt: torch.Tensor
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)  # generated so far; the last is the root
    logprobs: list[float] = field(default_factory=list)
    steps: int = 0  # verification steps this row took part in
    finish_reason: str = ""
    # Target features of committed tokens, [W, F], W <= the drafter's feature_window: entry
    # -1 belongs to history position features_end - 1. Up to date when that is the token
    # before the root (the root itself has not been through the target yet); behind it
    # after plain-decoding steps that skipped the capture. Only kept when the drafter
    # needs features.
    features: torch.Tensor | None = None
    features_end: int = 0

    def history(self) -> torch.Tensor:
        return torch.cat([self.prompt, torch.tensor(self.tokens, dtype=torch.long)])

    @property
    def committed(self) -> int:
        """History positions in the KV cache: all but the root."""
        return len(self.prompt) + len(self.tokens) - 1


@dataclass
class StepStats:
    rows: int
    tokens: int  # emitted (kept) this step over all rows
    accepted: int  # draft tokens accepted over all rows


class RowBook:
    """The draft side: active rows, the drafter, appending and finishing."""

    def __init__(self, drafter: Drafter | None, device: torch.device | str = "cpu") -> None:
        self.drafter = drafter
        self.device = device  # where plain decoding's empty tree goes: the target's device
        self.wants_features = drafter is not None and drafter.needs_features
        # How many of each row's latest features the drafter reads (an EAGLE head attends
        # over a short window of the row's context); older ones are dropped.
        self.feature_window = int(getattr(drafter, "feature_window", 1))
        self.rows: dict[int, Row] = {}
        self.finished: list[Row] = []
        self._next_id = 0

    def open(self, slot: int, prompt: torch.Tensor, sampling: Sampling) -> Row:
        row = Row(self._next_id, slot, prompt.long(), sampling)
        self._next_id += 1
        self.rows[row.row_id] = row
        return row

    def draft(self, rows: list[Row], shape: DraftShape | None) -> tuple[DraftTree, torch.Tensor | None]:
        if self.drafter is None or shape is None:
            return DraftTree.empty(len(rows), self.device), None
        has_features = self.wants_features and all(row.features is not None for row in rows)
        features = self._feature_window(rows) if has_features else None
        request = DraftRequest([r.history() for r in rows], features, [r.row_id for r in rows], shape)
        proposal = self.drafter.propose(request)
        return proposal.tree, proposal.draft_probs

    def _feature_window(self, rows: list[Row]) -> torch.Tensor:
        """[B, W, F]: each row's latest features, left-padded with zeros to a common W. A row
        has min(W, len(history) - 1) real entries, the last one at the token before its root."""
        width = max(len(row.features) for row in rows)
        window = rows[0].features.new_zeros(len(rows), width, rows[0].features.shape[-1])
        for b, row in enumerate(rows):
            window[b, width - len(row.features):] = row.features
        return window

    def _keep_features(self, row: Row, features: torch.Tensor, first: int) -> None:
        """Append the features of history positions first, first + 1, ...; a window that
        does not reach `first` (a gap of uncaptured steps) is dropped, never joined."""
        joined = features if row.features is None or row.features_end != first else torch.cat([row.features, features])
        row.features = joined[-self.feature_window:]
        row.features_end = first + len(features)

    def feature_gaps(self, rows: list[Row]) -> list[tuple[Row, int]]:
        """(row, first position to recompute) for each row whose window misses committed
        positions: from the end of its window, or the window's width back if the gap is wider."""
        if not self.wants_features:
            return []
        return [(row, max(row.features_end, row.committed - self.feature_window)) for row in rows
                if row.features_end < row.committed]

    def fill_gap(self, row: Row, first: int, features: torch.Tensor) -> None:
        """Features [committed - first, F] recomputed for history positions first.. (the gap)."""
        self._keep_features(row, features, first)

    def apply(self, rows: list[Row], verified: Verified, is_step: bool = True) -> list[Row]:
        """Append each row's tokens; returns the rows that finished (their slots are free to go).
        `is_step`: a verification step (False for the first token, sampled at prefill)."""
        done = []
        for b, row in enumerate(rows):
            count = int(verified.num_tokens[b])
            if self.wants_features and verified.features is not None:
                # prefill: the last prompt tokens (all, or the window's worth); a step: the
                # root and the accepted nodes, one per emitted token. Either way they end at
                # the newly committed history, so features stay aligned with history[:-1].
                kept = verified.features.shape[1] if not is_step else count
                first = row.committed if is_step else len(row.prompt) - kept  # the root sits at row.committed
                self._keep_features(row, verified.features[b, :kept], first)
            row.steps += int(is_step)
            if self._append(row, verified.tokens[b, :count].tolist(), verified.logprobs[b, :count].tolist()):
                done.append(row)
        return done

    def _append(self, row: Row, tokens: list[int], logprobs: list[float]) -> bool:
        for token, logprob in zip(tokens, logprobs, strict=True):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in row.sampling.stop_token_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.sampling.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason:
                row.features = None  # only the drafter reads them
                self.rows.pop(row.row_id)
                self.finished.append(row)
                if self.drafter is not None:
                    self.drafter.release_row(row.row_id)
                return True
        return False


class SpeculativeEngine:
    """`capture_while_plain`: capture the drafter's features on plain-decoding steps too (what
    the engine did before 2026-11-26; kept for benchmarks that show its cost). Otherwise a
    pass captures only when the last step drafted, and a row's missing features are
    recomputed from the KV cache when SD comes back on (`feature_rebuild.py`)."""

    def __init__(self, model: CausalLM, drafter: Drafter | None = None, max_rows: int = 16,
                 max_len: int = 512, seed: int = 0, capture_while_plain: bool = False) -> None:
        self.drafter_layers = tuple(getattr(drafter, "capture_layers", ()) or ()) if drafter is not None else ()
        self.capture_while_plain = capture_while_plain
        self.target = TargetRunner(model, max_rows, max_len, seed, capture_layers=self.drafter_layers)
        self.book = RowBook(drafter, self.target.device)

    @property
    def rows(self) -> dict[int, Row]:
        return self.book.rows

    @property
    def finished(self) -> list[Row]:
        return self.book.finished

    def add(self, prompts: list[torch.Tensor], sampling: Sampling, reserve: int = 0) -> list[int]:
        """Prefill rows (equal-length prompts share a pass) and sample their first tokens.
        `reserve`: cache positions a row needs for draft nodes in one step."""
        for prompt in prompts:
            self.target.check_admission(len(prompt), sampling, reserve)
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        ids = [0] * len(prompts)
        for indices in by_length.values():
            group = [prompts[i] for i in indices]
            slots, first = self.target.prefill(group, [sampling] * len(group))
            rows = [self.book.open(slot, prompt, sampling) for slot, prompt in zip(slots, group, strict=True)]
            self._release(self.book.apply(rows, first, is_step=False))
            for index, row in zip(indices, rows, strict=True):
                ids[index] = row.row_id
        return ids  # in the order of `prompts`, whatever order the prefill groups ran in

    def step(self, shape: DraftShape | None = None) -> StepStats:
        rows = list(self.book.rows.values())
        if not rows:
            return StepStats(0, 0, 0)
        self._capture(shape is not None)
        if shape is not None:
            self._fill_feature_gaps(rows)
        tree, draft_probs = self.book.draft(rows, shape)
        roots = torch.tensor([row.tokens[-1] for row in rows])
        verified = self.target.verify([r.slot for r in rows], roots, tree, draft_probs, [r.sampling for r in rows])
        before = sum(len(r.tokens) for r in rows)
        self._release(self.book.apply(rows, verified))
        # Tokens kept, not verified: a row that stops (or meets its budget) inside a step
        # drops what was accepted past that point, and counting it flatters drafting.
        return StepStats(len(rows), sum(len(r.tokens) for r in rows) - before, int(verified.num_accepted.sum()))

    def _capture(self, drafting: bool) -> None:
        """Capture features in the coming passes (this step's, and prefills until the next
        step) only while drafting: a plain step does not read them."""
        wanted = drafting or self.capture_while_plain
        self.target.capture_layers = self.drafter_layers if wanted else ()

    def _fill_feature_gaps(self, rows: list[Row]) -> None:
        """Before drafting: recompute the features that plain-decoding steps did not capture."""
        gaps = self.book.feature_gaps(rows)
        if not gaps:
            return
        spans = [(row.slot, row.history()[first: row.committed], first) for row, first in gaps]
        for (row, first), features in zip(gaps, self.target.committed_features(spans, self.drafter_layers),
                                          strict=True):
            self.book.fill_gap(row, first, features)

    def _release(self, done: list[Row]) -> None:
        for row in done:
            self.target.release(row.slot)

    def generate(self, prompts: list[torch.Tensor], sampling: Sampling,
                 shape: DraftShape | None = None) -> list[Row]:
        """All prompts to completion, admitting new rows as slots free up; rows in prompt order."""
        reserve = shape.num_draft if shape else 0
        waiting = list(enumerate(prompts))
        order: dict[int, int] = {}
        self.book.finished = []
        while waiting or self.book.rows:
            free = self.target.free_slots
            if waiting and free:
                admitted, waiting = waiting[:free], waiting[free:]
                ids = self.add([prompt for _, prompt in admitted], sampling, reserve)
                order.update({row_id: index for row_id, (index, _) in zip(ids, admitted, strict=True)})
            self.step(shape)
        return sorted(self.book.finished, key=lambda row: order[row.row_id])
