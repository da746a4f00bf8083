"""Draft trees: the shape of what a drafter proposes for one verification step.

Layout (shared with the verifier's forward pass and the acceptance rules)
-------------------------------------------------------------------------
Each row b of a batch holds up to n draft nodes, numbered 0..n-1. Node i has

- ``tokens[b, i]``: its token id,
- ``parents[b, i]``: the node it extends, ``-1`` meaning the root,
- parents come before children: ``parents[b, i] < i``.

The root is the row's last committed token, which has not been through the target
yet and is re-fed at the start of verification. So the verifier's input for row b is

    position 0      1        2       ...  n
    token    root   node 0   node 1  ...  node n-1      (``verify_tokens``)

and *position = node index + 1* everywhere (a parent of ``-1`` is position 0).
``attention_mask()`` is over these n + 1 positions; ``position_offsets()`` gives
each position's distance from the root (add the root's absolute position to get
position ids). A chain of k tokens is ``parents = [-1, 0, 1, ..., k-2]``.

Rows may have fewer valid nodes than n (``num_nodes[b]``); nodes at index
``>= num_nodes[b]`` are padding: they see only the root and themselves, nobody
sees them, and the acceptance rules never accept them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DraftTree:
    """A batch of draft trees, one per row (see the module docstring for the layout)."""

    tokens: Tensor  # long [B, n] token id of each draft node
    parents: Tensor  # long [B, n] parent node index, -1 = the root
    num_nodes: Tensor  # long [B] valid nodes per row; the rest is padding

    def __post_init__(self) -> None:
        b, n = self.tokens.shape
        if self.parents.shape != (b, n) or self.num_nodes.shape != (b,):
            raise ValueError(
                f"DraftTree shapes disagree: tokens {tuple(self.tokens.shape)}, "
                f"parents {tuple(self.parents.shape)}, num_nodes {tuple(self.num_nodes.shape)}"
            )

    # ----------------------------------------------------------------- building

    @classmethod
    def from_parents(
        cls, tokens: Tensor, parents: Tensor, num_nodes: Tensor | None = None
    ) -> DraftTree:
        """A tree from per-node parents; checks that parents come before children."""
        tokens, parents = tokens.long(), parents.long()
        if num_nodes is None:
            num_nodes = torch.full(tokens.shape[:1], tokens.shape[1], device=tokens.device)
        tree = cls(tokens, parents, num_nodes.long())
        tree.check()
        return tree

    @classmethod
    def chain(cls, tokens: Tensor, num_nodes: Tensor | None = None) -> DraftTree:
        """A chain of k = tokens.shape[1] drafts per row: node i extends node i - 1."""
        b, k = tokens.shape
        parents = torch.arange(-1, k - 1, device=tokens.device).expand(b, k)
        return cls.from_parents(tokens, parents.contiguous(), num_nodes).marked_chain()

    def marked_chain(self) -> DraftTree:
        """This tree, known to be a chain (parents = [-1, 0, 1, ...]): whoever built it says
        so, since finding out from the tensors costs the ops the mark saves. Verification
        then runs causally and the ancestor table is a triangle (``is_chain``)."""
        object.__setattr__(self, "_chain", True)  # a hint, not state: frozen otherwise
        return self

    def is_chain(self) -> bool:
        """True for a tree built as a chain (or with no nodes): node i's ancestors are the
        nodes before it, so the tokens of [root, nodes] are simply causal."""
        return self.width == 0 or self.__dict__.get("_chain", False)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str = "cpu") -> DraftTree:
        """No draft nodes: verification is plain decoding of the root."""
        none = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return cls(none, none.clone(), torch.zeros(batch_size, dtype=torch.long, device=device))

    def check(self) -> None:
        """Raise ValueError unless every valid node's parent is -1 or an earlier node."""
        n = self.width
        index = torch.arange(n, device=self.tokens.device)
        valid = self.valid_mask()
        bad = valid & ((self.parents < -1) | (self.parents >= index))
        if bool(bad.any()) or bool(((self.num_nodes < 0) | (self.num_nodes > n)).any()):
            raise ValueError("DraftTree: parents must satisfy -1 <= parents[b, i] < i")

    # ----------------------------------------------------------------- shape

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        """n: node slots per row (valid nodes plus padding)."""
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def valid_mask(self) -> Tensor:
        """bool [B, n]: True for real nodes, False for padding."""
        index = torch.arange(self.width, device=self.device)
        return index < self.num_nodes[:, None]

    def effective_parents(self) -> Tensor:
        """Parents with padding nodes hung directly under the root, so they stay isolated."""
        return torch.where(self.valid_mask(), self.parents, -1)

    # ----------------------------------------------------------------- verification inputs

    def verify_tokens(self, root_tokens: Tensor) -> Tensor:
        """long [B, n + 1]: the root token of each row followed by its draft nodes."""
        return torch.cat([root_tokens.long().reshape(-1, 1), self.tokens], dim=1)

    def depths(self) -> Tensor:
        """long [B, n]: 1 for children of the root, parent's depth + 1 below; 0 for padding."""
        parents = self.effective_parents()
        depth = torch.zeros_like(parents)
        for i in range(self.width):  # parents come first, so one pass settles every depth
            parent_depth = depth.gather(1, parents[:, i : i + 1].clamp(min=0))[:, 0]
            depth[:, i] = torch.where(parents[:, i] < 0, 1, parent_depth + 1)
        return depth * self.valid_mask()

    def position_offsets(self) -> Tensor:
        """long [B, n + 1]: each verification position's distance from the root (root = 0)."""
        root = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        return torch.cat([root, self.depths()], dim=1)

    def ancestors(self) -> Tensor:
        """bool [B, n, n]: [b, i, j] is True when node j is node i or one of its ancestors.

        Computed once per tree (the verifier's mask and the greedy acceptance both read
        it); treat the result as read-only."""
        cached = self.__dict__.get("_ancestors")
        if cached is None:
            cached = self._compute_ancestors()
            object.__setattr__(self, "_ancestors", cached)  # a cache, not state: frozen otherwise
        return cached

    def _compute_ancestors(self) -> Tensor:
        if self.is_chain():
            # Valid nodes come first and each sees the ones before it; padding sees itself.
            n = self.width
            triangle = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            return (triangle & self.valid_mask()[:, :, None]) | torch.eye(n, dtype=torch.bool, device=self.device)
        return self._doubled_ancestors()

    def _doubled_ancestors(self) -> Tensor:
        """Path doubling: start from "self or parent", then let every node also take its
        known ancestors' ancestors; after k rounds paths of up to 2^k edges are covered.
        log2(n) batched matmuls instead of a loop over the n nodes (op count is what a
        small-batch step pays for)."""
        n = self.width
        parents = self.effective_parents()
        index = torch.arange(n, device=self.device)
        reach = ((parents[:, :, None] == index) | (index[:, None] == index)).float()  # [b, i, j]
        covered = 1
        while covered < n:
            reach = (reach @ reach).clamp(max=1.0)
            covered *= 2
        return reach.bool()

    def attention_mask(self) -> Tensor:
        """bool [B, n + 1, n + 1] over [root, node 0..n-1]: True where query may see key.

        Every position sees the root and itself; a node also sees its ancestors.
        Earlier context (the KV cache) is visible to all and is not part of this mask.
        """
        b, n = self.batch_size, self.width
        mask = torch.zeros(b, n + 1, n + 1, dtype=torch.bool, device=self.device)
        mask[:, :, 0] = True
        mask[:, 1:, 1:] = self.ancestors()
        return mask

    # ----------------------------------------------------------------- navigation

    def children_table(self) -> Tensor:
        """long [B, n + 1, C]: children of each position in node order, padded with -1.

        Position 0 is the root, position i + 1 is node i; entries are node indices.
        C is the largest number of children any position has (0 for an empty tree).
        """
        b, n = self.batch_size, self.width
        valid = self.valid_mask()
        parent_pos = self.parents.clamp(min=-1) + 1
        same_parent = parent_pos[:, :, None] == parent_pos[:, None, :]
        earlier = torch.ones(n, n, dtype=torch.bool, device=self.device).tril(-1)
        rank = (same_parent & earlier & valid[:, None, :]).sum(-1)  # earlier siblings
        c = int(rank.masked_fill(~valid, -1).max()) + 1 if n else 0
        table = torch.full((b, (n + 1) * c + 1), -1, dtype=torch.long, device=self.device)
        slot = torch.where(valid, parent_pos * c + rank, (n + 1) * c)  # padding -> spare slot
        node = torch.arange(n, device=self.device).expand(b, n)
        table.scatter_(1, slot, node)
        return table[:, :-1].reshape(b, n + 1, c)

    def children_of(self, row: int, node: int) -> list[int]:
        """Valid children of `node` (-1 = root) in row `row`, in node order."""
        count = int(self.num_nodes[row])
        parents = self.parents[row, :count].tolist()
        return [i for i, p in enumerate(parents) if p == node]

    def path_to(self, row: int, node: int) -> list[int]:
        """Nodes from the root's child down to `node` (inclusive); [] for the root."""
        parents = self.parents[row].tolist()
        path = []
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]


class TopNTreeBuilder:
    """Grows a draft tree EAGLE-2 style and prunes it to the n most probable nodes.

    Step 1 takes the top-t tokens of the drafter's distribution at the root. Each
    later step expands the *frontier* (the t most probable nodes of the newest layer,
    by cumulative draft probability = product of q along the path): every frontier
    node proposes its top-t tokens, and the best t of those t * t become the next
    frontier. All proposed nodes form the candidate pool; ``finish(n)`` keeps the n
    with the highest cumulative probability. A child's cumulative probability never
    exceeds its parent's, so the kept set contains every kept node's ancestors.

    The candidates are a deterministic function of the context (top-t, distinct per
    parent), which is what ``acceptance.accept_deterministic`` requires.
    """

    def __init__(self, root_probs: Tensor, branch: int):
        """root_probs: float [B, V], the drafter's next-token distribution at the root."""
        self.branch = branch
        b = root_probs.shape[0]
        logq, tokens = _top_log_probs(root_probs, branch)
        self._tokens = [tokens]
        self._parents = [torch.full_like(tokens, -1)]
        self._scores = [logq]
        self.frontier = torch.arange(branch, device=root_probs.device).expand(b, branch)

    @property
    def pool_size(self) -> int:
        return sum(t.shape[1] for t in self._tokens)

    def frontier_tokens(self) -> Tensor:
        """long [B, t]: tokens of the nodes the next ``expand`` call needs distributions for."""
        return torch.cat(self._tokens, 1).gather(1, self.frontier)

    def frontier_parents(self) -> Tensor:
        """long [B, t]: pool index of each frontier node's parent, -1 = the root."""
        return torch.cat(self._parents, 1).gather(1, self.frontier)

    def pool_tree(self) -> DraftTree:
        """Every candidate so far as a DraftTree (pool index = node index), for drafter masks."""
        return DraftTree(
            torch.cat(self._tokens, 1),
            torch.cat(self._parents, 1),
            torch.full((self._tokens[0].shape[0],), self.pool_size, device=self.frontier.device),
        )

    def expand(self, frontier_probs: Tensor) -> None:
        """Add one layer. frontier_probs: float [B, t, V], q at each frontier node."""
        b, t = self.frontier.shape
        scores = torch.cat(self._scores, 1)
        logq, tokens = _top_log_probs(frontier_probs, self.branch)  # [B, t, t]
        child_scores = (scores.gather(1, self.frontier)[:, :, None] + logq).reshape(b, -1)
        parents = self.frontier[:, :, None].expand(b, t, self.branch).reshape(b, -1)
        first_new = self.pool_size
        self._tokens.append(tokens.reshape(b, -1))
        self._parents.append(parents)
        self._scores.append(child_scores)
        best = _stable_top(child_scores, min(self.branch, child_scores.shape[1]))
        self.frontier = first_new + best

    def finish(self, num_draft: int) -> DraftTree:
        """The n = min(num_draft, pool size) best candidates, re-indexed parents-first."""
        scores = torch.cat(self._scores, 1)
        n = min(num_draft, scores.shape[1])
        # Stable sort: on ties the earlier pool index (a parent) wins, keeping ancestors in.
        kept = _stable_top(scores, n).sort(dim=1).values  # pool order = parents first
        tokens = torch.cat(self._tokens, 1).gather(1, kept)
        pool_parents = torch.cat(self._parents, 1).gather(1, kept)
        new_index = torch.full_like(scores, -1, dtype=torch.long)
        new_index.scatter_(1, kept, torch.arange(n, device=kept.device).expand_as(kept))
        parents = torch.where(pool_parents < 0, -1, new_index.gather(1, pool_parents.clamp(min=0)))
        return DraftTree.from_parents(tokens, parents)


def build_topn_tree(
    root_probs: Tensor,
    next_probs: Callable[[TopNTreeBuilder], Tensor],
    steps: int,
    branch: int,
    num_draft: int,
) -> DraftTree:
    """The ReSpec (s, t, n) draft: s steps of top-t expansion, pruned to n nodes.

    next_probs(builder) must return the drafter's distributions [B, t, V] at
    ``builder.frontier`` (whose tokens are ``builder.frontier_tokens()`` and whose
    contexts are paths in ``builder.pool_tree()``). t = 1 gives a chain of s tokens.
    """
    builder = TopNTreeBuilder(root_probs, branch)
    for _ in range(steps - 1):
        builder.expand(next_probs(builder))
    return builder.finish(num_draft)


def _top_log_probs(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k tokens of the last dim and their log-probabilities (log 0 = -inf)."""
    values, tokens = probs.topk(k, dim=-1)
    return values.float().log(), tokens


def _stable_top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores per row; ties go to the lower index."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
