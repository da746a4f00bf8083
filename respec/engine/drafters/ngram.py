"""Prompt-lookup drafting: no model, just earlier occurrences of the row's last tokens.

For each row, find the earlier places where the history's last k tokens occurred
(k from max_n down to min_n; the longest k with any occurrence wins) and propose
what followed them.

- Continuations copy with overlap, as LZ77 does: when a match is only d tokens
  back, its continuation runs into the suffix itself and then repeats with period
  d. That is exactly what would follow if the drafts were accepted, and it lets a
  short loop (``7 7 7`` or ``a b a b``) be drafted s tokens ahead instead of d.
- The draft is the trie of the matches' continuations, s tokens deep, with matches
  inserted most recent first and each node keeping its first t distinct child
  tokens. With t = 1 that is the most recent match's continuation.
- Pruning to n nodes keeps the nodes supported by the most matches (ties: most
  recent first). With deterministic drafts the expected accepted length is the sum
  over nodes of P(the node's path is what the target says), and the share of
  matches through a node estimates that; a child never has more support than its
  parent, so the kept set is closed under ancestors.

Cost per row: O(L * max_n) tensor work to find matches, O(L * s) to read
continuations, and a Python trie over the *distinct* continuations only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from respec.engine.drafters.base import Drafter, DraftProposal, DraftRequest
from respec.engine.tree import DraftTree


@dataclass
class _TrieNode:
    token: int
    parent: int  # node index, -1 = the root
    support: int  # matches whose continuation passes through this node


class NgramDrafter(Drafter):
    """Proposes, for each row, what followed earlier occurrences of its last k tokens."""

    needs_features = False

    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramDrafter needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, request: DraftRequest) -> DraftProposal:
        shape = request.shape
        drafts = [
            draft_row(history, shape.steps, shape.branch, shape.num_draft, self.min_n, self.max_n)
            for history in request.histories
        ]
        return DraftProposal(pack_drafts(drafts, shape.num_draft, request.device))


# ------------------------------------------------------------------- one row


def draft_row(
    history: Tensor, steps: int, branch: int, num_draft: int, min_n: int, max_n: int
) -> tuple[list[int], list[int]]:
    """(tokens, parents) of one row's draft, parents first, at most num_draft nodes."""
    history = history.detach().to("cpu", torch.long)
    match_ends = find_suffix_matches(history, min_n, max_n)
    if match_ends.numel() == 0:
        return [], []
    continuations = read_continuations(history, match_ends + 1, steps)
    distinct, counts = distinct_rows_in_order(continuations)
    nodes = build_trie(distinct.tolist(), counts.tolist(), branch)
    return prune_by_support(nodes, num_draft)


def find_suffix_matches(history: Tensor, min_n: int, max_n: int) -> Tensor:
    """End positions of the earlier occurrences of the longest matching suffix, latest first.

    A suffix of length k in [min_n, max_n] matches at end position j < L - 1 when
    history[j - k + 1 : j + 1] == history[L - k :]. Returns long [M] (empty if none).
    """
    lengths = suffix_match_lengths(history, max_n)
    if lengths.numel() == 0:
        return lengths
    longest = int(lengths.max())
    if longest < min_n:
        return lengths.new_empty(0)
    return (lengths == longest).nonzero()[:, 0].flip(0)


def suffix_match_lengths(history: Tensor, max_n: int) -> Tensor:
    """long [L - 1]: for each end position j, how many tokens (capped at max_n) of the
    history ending at j agree with the history's suffix. O(L * max_n), no quadratic scan."""
    length = history.shape[0]
    candidates = max(length - 1, 0)  # the suffix itself (j = L - 1) is not an earlier match
    matched = torch.zeros(candidates, dtype=torch.long)
    still_matching = torch.ones(candidates, dtype=torch.bool)
    for back in range(min(max_n, candidates)):
        # Compare history[j - back] with history[L - 1 - back]; j < back has nothing there.
        same = torch.zeros(candidates, dtype=torch.bool)
        same[back:] = history[: candidates - back] == history[length - 1 - back]
        still_matching &= same
        if not bool(still_matching.any()):
            break
        matched += still_matching
    return matched


def read_continuations(history: Tensor, starts: Tensor, steps: int) -> Tensor:
    """long [M, steps]: the tokens from each start on, copied with overlap past the end.

    A start d = L - start tokens before the end continues as history[start + (i mod d)]:
    position L + i of "history + continuation" equals position start + i, which is
    the continuation's own token i - d once start + i reaches L.
    """
    distance = history.shape[0] - starts  # >= 1 because every start is <= L - 1
    offsets = torch.arange(steps)[None, :] % distance[:, None]
    return history[starts[:, None] + offsets]


def distinct_rows_in_order(rows: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows of `rows` [M, s] in order of first appearance, and their counts.

    Many matches share a continuation (a repeated phrase, a long run of one token);
    deduplicating first keeps the Python trie small whatever the history length.
    """
    distinct, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    first_seen = torch.full((distinct.shape[0],), rows.shape[0], dtype=torch.long)
    first_seen.scatter_reduce_(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    order = first_seen.argsort()
    return distinct[order], counts[order]


def build_trie(continuations: list[list[int]], counts: list[int], branch: int) -> list[_TrieNode]:
    """The trie of the continuations (in the given order), at most `branch` children per
    node; a continuation that meets a full node stops there. Node order = insertion order,
    so parents come before children and earlier continuations come first."""
    nodes: list[_TrieNode] = []
    child_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    num_children: defaultdict[int, int] = defaultdict(int)
    for tokens, count in zip(continuations, counts, strict=True):
        parent = -1
        for token in tokens:
            node = child_of.get((parent, token))
            if node is None:
                if num_children[parent] >= branch:
                    break
                node = len(nodes)
                nodes.append(_TrieNode(token, parent, 0))
                child_of[(parent, token)] = node
                num_children[parent] += 1
            nodes[node].support += count
            parent = node
    return nodes


def prune_by_support(nodes: list[_TrieNode], num_draft: int) -> tuple[list[int], list[int]]:
    """Keep the num_draft best-supported nodes (ties: earlier first), in their original
    order, with parents re-indexed. A parent is earlier than its child and has at least
    its support, so it always ranks ahead and is kept whenever the child is."""
    ranked = sorted(range(len(nodes)), key=lambda i: (-nodes[i].support, i))
    kept = sorted(ranked[:num_draft])
    new_index = {old: new for new, old in enumerate(kept)}
    tokens = [nodes[i].token for i in kept]
    parents = [new_index[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in kept]
    return tokens, parents


# ------------------------------------------------------------------- the batch


def pack_drafts(
    drafts: list[tuple[list[int], list[int]]], width: int, device: torch.device
) -> DraftTree:
    """One DraftTree of exactly `width` node slots per row (a fixed verification shape);
    rows with fewer nodes are padded with token 0 under the root."""
    tokens = torch.zeros(len(drafts), width, dtype=torch.long)
    parents = torch.full((len(drafts), width), -1, dtype=torch.long)
    num_nodes = torch.zeros(len(drafts), dtype=torch.long)
    for row, (row_tokens, row_parents) in enumerate(drafts):
        count = len(row_tokens)
        tokens[row, :count] = torch.tensor(row_tokens, dtype=torch.long)
        parents[row, :count] = torch.tensor(row_parents, dtype=torch.long)
        num_nodes[row] = count
    return DraftTree.from_parents(tokens.to(device), parents.to(device), num_nodes.to(device))
