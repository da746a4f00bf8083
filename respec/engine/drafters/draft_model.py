"""A small draft model: a ``CausalLM`` with the target's vocabulary proposes the drafts.

Each row owns one slot of the drafter's own ``KVCache`` (taken on the row's first
proposal, returned by ``release_row`` / ``reset_row``). The cache holds the row's
committed history except its last token (the root): every proposal feeds the tokens
the cache has not seen yet, root included, in one right-padded pass, keeps all but the
root, and so always has the root's logits to start from (even if asked twice without
new tokens). Steady state that is the accepted tokens of the last step plus the root.

The tree is grown with ``build_topn_tree`` (top-t per step, pruned to n; t = 1 gives
a greedy chain of s tokens). Tree nodes are never committed: each drafting step
re-feeds the root and the whole candidate pool above the committed cache with a tree
mask, so a proposal of s steps costs 1 + (s - 1) passes over at most 1 + t + (s - 2) t^2
tokens each: simple and exact, at the price of recomputing the pool every step. Drafts are top-t
of the draft model, a deterministic function of the context, so ``draft_probs`` is None.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from respec.engine.drafters.base import Drafter, DraftProposal, DraftRequest
from respec.engine.drafters.eagle import pad_tree
from respec.engine.kv_cache import KVCache
from respec.engine.model import CausalLM
from respec.engine.tree import DraftTree, TopNTreeBuilder, build_topn_tree


class DraftModelDrafter(Drafter):
    """Top-t trees (or greedy chains) from a smaller model of the same vocabulary."""

    needs_features = False

    def __init__(self, model: CausalLM, max_rows: int, max_len: int) -> None:
        """max_rows: rows drafted for at once (one cache slot each). max_len: the longest
        history it drafts for, plus 1 + t + (s - 2) t^2 positions for the root and the pool."""
        parameter = next(model.parameters())
        self.model = model
        self.cache = KVCache(model.config, max_rows, max_len, parameter.dtype, parameter.device)
        self.slot_of: dict[int, int] = {}  # row id -> cache slot
        self.cached: dict[int, Tensor] = {}  # row id -> the tokens its slot holds
        self.version = 0

    # ------------------------------------------------------------------ per-row state

    def reset_row(self, row_id: int) -> None:
        self.release_row(row_id)

    def release_row(self, row_id: int) -> None:
        slot = self.slot_of.pop(row_id, None)
        self.cached.pop(row_id, None)
        if slot is not None:
            self.cache.free(slot)

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=False)
        self.version = version
        for row_id in list(self.slot_of):  # cached K/V came from the old weights
            self.release_row(row_id)

    def _slot(self, row_id: int, history: Tensor) -> int:
        """The row's slot, emptied first when its cached tokens are no prefix of history
        (a row id reused without reset_row): stale K/V would silently change the drafts."""
        cached = self.cached.get(row_id)
        if cached is not None and not torch.equal(history[: len(cached)].cpu(), cached):
            self.release_row(row_id)
        if row_id not in self.slot_of:
            self.slot_of[row_id] = self.cache.allocate()
            self.cached[row_id] = history[:0].cpu()
        return self.slot_of[row_id]

    # ------------------------------------------------------------------ drafting

    def propose(self, request: DraftRequest) -> DraftProposal:
        shape = request.shape
        if request.batch_size == 0:
            return DraftProposal(pad_tree(DraftTree.empty(0, request.device), shape.num_draft))
        slots = torch.tensor(
            [self._slot(row, h) for row, h in zip(request.rows, request.histories, strict=True)],
            device=self.cache.device,
        )
        with torch.no_grad():
            root_probs = self._catch_up(request, slots)
            roots = torch.stack([h[-1] for h in request.histories]).to(self.cache.device)

            def next_probs(builder: TopNTreeBuilder) -> Tensor:
                return self._frontier_probs(builder, roots, slots)

            tree = build_topn_tree(root_probs, next_probs, shape.steps, shape.branch, shape.num_draft)
        return DraftProposal(pad_tree(tree, shape.num_draft))

    def _catch_up(self, request: DraftRequest, slots: Tensor) -> Tensor:
        """Feed each row's unseen tokens up to the root; commit all but the root.
        Returns the draft distribution after the root, float [B, V]."""
        starts = [len(self.cached[row]) for row in request.rows]
        pieces = [h[start:] for h, start in zip(request.histories, starts, strict=True)]
        counts = torch.tensor([len(p) for p in pieces], device=self.cache.device)
        tokens = torch.zeros(len(pieces), int(counts.max()), dtype=torch.long, device=self.cache.device)
        for b, piece in enumerate(pieces):
            tokens[b, : len(piece)] = piece.to(self.cache.device)
        logits = self.model.forward_cached(tokens, self.cache, slots, num_tokens=counts, only_last=True).logits
        self.cache.advance(slots, counts - 1)
        for row, history in zip(request.rows, request.histories, strict=True):
            self.cached[row] = history[:-1].cpu()
        return torch.softmax(logits[:, 0].float(), dim=-1)

    def _frontier_probs(self, builder: TopNTreeBuilder, roots: Tensor, slots: Tensor) -> Tensor:
        """q [B, t, V] at the frontier: [root, pool nodes] are fed above the committed cache
        in the verification layout, with the pool's tree mask."""
        pool = builder.pool_tree()
        inputs = pool.verify_tokens(roots).to(self.cache.device)
        logits = self.model.forward_cached(inputs, self.cache, slots,
                                           tree_mask=pool.attention_mask().to(self.cache.device)).logits
        positions = (builder.frontier + 1).to(logits.device)  # node i sits at position i + 1
        at_frontier = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        return torch.softmax(at_frontier.float(), dim=-1)
