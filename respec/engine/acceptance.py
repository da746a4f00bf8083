"""Lossless acceptance rules of speculative decoding, batched over rows.

Inputs (layouts of ``respec.engine.tree``: position 0 is the root, position i + 1 is node i)

- ``tree``: a ``DraftTree`` with n node slots per row.
- ``target_probs``: float [B, n + 1, V]. Position j holds the target's next-token
  distribution after the token at position j, i.e. what the target would sample
  next at the root (j = 0) or at node j - 1. Already processed (temperature,
  top-k, top-p); for greedy rows anything whose argmax is the greedy token.
- ``draft_probs`` (sampled drafts only): float [B, n, V]. Row i is the drafter's
  distribution that node i's token was *sampled from*, i.e. the drafter's
  next-token distribution at node i's parent (siblings share it).

Every rule walks the tree from the root. At the current node it tries the
children in node order; the first accepted child becomes the current node. When
no child is accepted (or there is none), one bonus token is drawn from what is
left of the target distribution at the current node and the walk ends. So each
row outputs ``num_accepted + 1`` tokens, distributed exactly as the target would
have sampled them one by one.

Random draws come from a ``torch.Generator`` (drawn in order, as the tests' statistical
checks do) or from the rows' own counter-based streams (``RowStreams``, what the engine
uses): at depth d of the walk the bonus takes u(position + d, lane 0) and, for the
sampled rule, the j-th child tried takes u(position + d, lane j + 1); so every draw is a
fresh, independent uniform and a row's result depends on nothing but its own stream.

Rules
- greedy: accept a child iff it is the argmax of the target at its parent;
  the bonus is the argmax at the last accepted node.
- deterministic drafts (the candidates at a node are a deterministic function of
  the context, e.g. the drafter's top-t; a chain of argmax drafts is t = 1): draw the
  token x that plain sampling would draw there (inverse CDF of p with the position's
  lane-0 uniform); accept the child whose token is x, else x is the bonus. Child c is
  accepted with probability p(c) and the bonus, when none is, follows p without the
  children: the law of trying the children one by one (accept c with probability r(c),
  r = p with the rejected ones removed), with one draw per position instead of one per
  child. And the output is the very token plain sampling draws from that uniform: with
  row streams a row's tokens do not depend on whether, what or how much was drafted
  (SD on or off, the draft shape, the drafter's weights).
- sampled drafts (children drawn i.i.d. from q; a chain is one child per node,
  Leviathan et al. 2023; several is SpecInfer's multi-draft rule): accept x with
  probability min(1, r(x) / q(x)); on rejection r <- norm(max(r - q, 0)); r = p
  at first; the bonus comes from the final r.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from respec.engine.sampling import RowStreams, sample_inverse_cdf
from respec.engine.tree import DraftTree

# What a rule draws its uniforms from: a generator (or None: torch's default), or [B]
# uniforms already drawn from the rows' streams for this very draw.
Draw = torch.Generator | Tensor | None


@dataclass(frozen=True)
class Acceptance:
    """What one verification step keeps, per row. D = the tree's largest depth."""

    num_accepted: Tensor  # long [B] accepted draft nodes (the bonus not counted)
    path: Tensor  # long [B, D] accepted node indices root-down, padded with -1
    tokens: Tensor  # long [B, D + 1] accepted tokens then the bonus token, padded with -1
    bonus_node: Tensor  # long [B] node whose target distribution gave the bonus (-1 = root)

    @property
    def num_tokens(self) -> Tensor:
        """long [B]: tokens emitted per row, num_accepted + 1."""
        return self.num_accepted + 1

    def source_positions(self) -> Tensor:
        """long [B, D + 1]: for each output token, the verification position whose target
        distribution it was drawn under (root = 0, node i = i + 1); -1 past the end.

        Also the positions whose KV entries to keep: the root and the accepted nodes.
        """
        root = self.path.new_zeros(self.path.shape[0], 1)  # (path[:, :1] is empty for an empty tree)
        positions = torch.cat([root, self.path + 1], dim=1)
        return torch.where(self._emitted(), positions, -1)

    def _emitted(self) -> Tensor:
        index = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return index <= self.num_accepted[:, None]


def output_logprobs(target_probs: Tensor, result: Acceptance) -> Tensor:
    """float [B, D + 1]: log p of each output token under the target where it was drawn;
    0 past the end. These are the behaviour log-probabilities RL needs."""
    positions = result.source_positions()
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    logp = target_probs[rows, positions.clamp(min=0), result.tokens.clamp(min=0)].float().log()
    return torch.where(positions >= 0, logp, 0.0)


# ------------------------------------------------------------------- the three rules
# A rule is three small functions over the current residual r [B, V]. Tests swap in
# deliberately broken rules to show that the statistical tests can fail.


@dataclass(frozen=True)
class Rule:
    # (r, q, token, draw) -> bool [B]: keep this child?
    accept: Callable[[Tensor, Tensor | None, Tensor, Draw], Tensor]
    # (r, q, token) -> new r [B, V] after the child was rejected
    after_reject: Callable[[Tensor, Tensor | None, Tensor], Tensor]
    # (r, draw) -> long [B] bonus token
    bonus: Callable[[Tensor, Draw], Tensor]
    # every child tried at a depth and its bonus read the one draw of that position
    shared_draw: bool = False


def _greedy_accept(r: Tensor, q: Tensor | None, token: Tensor, gen) -> Tensor:
    return token == r.argmax(-1)


def _greedy_bonus(r: Tensor, gen) -> Tensor:
    return r.argmax(-1)


def _keep_residual(r: Tensor, q: Tensor | None, token: Tensor) -> Tensor:
    return r  # greedy, deterministic: the bonus is the position's own pick whatever was rejected


def _is_plain_sample(r: Tensor, q: Tensor | None, token: Tensor, draw) -> Tensor:
    return _sample(r, draw) == token  # r stays p at this position: rejections keep it


def _sampled_accept(r: Tensor, q: Tensor, token: Tensor, gen) -> Tensor:
    r_x, q_x = _at(r, token), _at(q, token)
    # q(x) = 0 cannot happen for a token sampled from q; accept then iff r(x) > 0.
    ratio = torch.where(q_x > 0, r_x / q_x.clamp(min=1e-30), (r_x > 0).to(r.dtype))
    return _uniform(r, gen) < ratio.clamp(max=1.0)


def _subtract_draft(r: Tensor, q: Tensor, token: Tensor) -> Tensor:
    return _normalise((r - q).clamp(min=0.0), fallback=r)


def _sample_bonus(r: Tensor, gen) -> Tensor:
    return _sample(r, gen)


GREEDY = Rule(_greedy_accept, _keep_residual, _greedy_bonus)
DETERMINISTIC = Rule(_is_plain_sample, _keep_residual, _sample_bonus, shared_draw=True)
SAMPLED = Rule(_sampled_accept, _subtract_draft, _sample_bonus)


# ------------------------------------------------------------------- public entry points


def accept_greedy(tree: DraftTree, target_probs: Tensor) -> Acceptance:
    """Temperature 0: keep the longest path that matches the target's argmax.

    The same result as ``walk_tree(tree, target_probs, GREEDY)``, without its loop over
    levels and children: greedy acceptance needs no residual, so every node can be
    judged at once (``_greedy_path``), which matters at small batch where each step's
    cost is mostly the number of small tensor ops.
    """
    best = target_probs.argmax(-1)  # [B, n + 1]: the target's token at every position
    b, n = tree.batch_size, tree.width
    if n == 0:
        none = best.new_full((b,), -1)
        return Acceptance(none + 1, best.new_empty(b, 0), best[:, :1], none)
    if tree.is_chain():
        return _greedy_chain(tree, best)
    on_path, depth = _greedy_path(tree, best)
    num_accepted = on_path.sum(1)
    path_width = int(depth.max())
    index = torch.arange(n, device=tree.device)
    path = torch.where(on_path, index, n).sort(dim=1).values[:, :path_width]  # parents come first
    path = torch.where(path < n, path, -1)
    last = path.gather(1, (num_accepted - 1).clamp(min=0)[:, None])[:, 0] if path_width else num_accepted * 0
    bonus_node = torch.where(num_accepted > 0, last, -1)
    tokens = torch.where(path >= 0, tree.tokens.gather(1, path.clamp(min=0)), -1)
    tokens = torch.cat([tokens, tokens.new_full((b, 1), -1)], dim=1)
    tokens.scatter_(1, num_accepted[:, None], best.gather(1, bonus_node[:, None] + 1))
    return Acceptance(num_accepted, path, tokens, bonus_node)


def _greedy_chain(tree: DraftTree, best: Tensor) -> Acceptance:
    """``accept_greedy`` for a chain: draft i is kept while it and every draft before it
    equal the target's argmax at their parent (position i); a third of the general ops."""
    b, n = tree.batch_size, tree.width
    width = int(tree.num_nodes.max())  # the deepest valid node, as the general path counts it
    num_accepted = ((tree.tokens == best[:, :n]) & tree.valid_mask()).long().cumprod(1).sum(1)
    index = torch.arange(width, device=tree.device)
    path = torch.where(index < num_accepted[:, None], index, -1)
    tokens = torch.cat([torch.where(path >= 0, tree.tokens[:, :width], -1), best.new_full((b, 1), -1)], dim=1)
    tokens.scatter_(1, num_accepted[:, None], best.gather(1, num_accepted[:, None]))
    return Acceptance(num_accepted, path, tokens, num_accepted - 1)


def _greedy_path(tree: DraftTree, best: Tensor) -> tuple[Tensor, Tensor]:
    """(bool [B, n] nodes the greedy walk accepts, long [B, n] node depths, 0 = padding).

    The walk takes, at each accepted node, its first child (in node order) whose token is
    the target's argmax there; so a node is on the path iff it and each of its ancestors
    match and no earlier sibling of theirs matched first.
    """
    parents, valid = tree.effective_parents(), tree.valid_mask()
    match = valid & (tree.tokens == best.gather(1, parents + 1))
    earlier = torch.ones(tree.width, tree.width, dtype=torch.bool, device=tree.device).tril(-1)
    sibling = (parents[:, :, None] == parents[:, None, :]) & earlier  # [b, i, j]: j is an earlier sibling
    chosen = match & ~(sibling & match[:, None, :]).any(-1)
    ancestors = tree.ancestors()  # includes the node itself
    on_path = ~(ancestors & ~chosen[:, None, :]).any(-1) & valid
    return on_path, ancestors.sum(-1) * valid


def accept_deterministic(
    tree: DraftTree, target_probs: Tensor, generator: torch.Generator | RowStreams | None = None
) -> Acceptance:
    """Drafts that are a deterministic function of their context (top-t, argmax chain)."""
    return walk_tree(tree, target_probs, DETERMINISTIC, generator=generator)


def accept_sampled(
    tree: DraftTree,
    target_probs: Tensor,
    draft_probs: Tensor,
    generator: torch.Generator | RowStreams | None = None,
) -> Acceptance:
    """Drafts sampled from q: a chain (Leviathan et al.) or i.i.d. siblings (SpecInfer)."""
    return walk_tree(tree, target_probs, SAMPLED, draft_probs, generator)


def accept(
    tree: DraftTree,
    target_probs: Tensor,
    draft_probs: Tensor | None = None,
    greedy: bool | Tensor = False,
    generator: torch.Generator | RowStreams | None = None,
) -> Acceptance:
    """Pick the rule: greedy rows (bool or bool [B]) take argmax; the others take the
    sampled rule when draft_probs is given, the deterministic rule otherwise."""
    if isinstance(greedy, bool) and greedy or isinstance(greedy, Tensor) and bool(greedy.all()):
        return accept_greedy(tree, target_probs)  # no random draws: none are needed
    if draft_probs is None:
        result = accept_deterministic(tree, target_probs, generator)
    else:
        result = accept_sampled(tree, target_probs, draft_probs, generator)
    if isinstance(greedy, Tensor) and bool(greedy.any()):
        result = _choose_rows(greedy, accept_greedy(tree, target_probs), result)
    return result


# ------------------------------------------------------------------- the walk


def walk_tree(
    tree: DraftTree,
    target_probs: Tensor,
    rule: Rule,
    draft_probs: Tensor | None = None,
    generator: torch.Generator | RowStreams | None = None,
) -> Acceptance:
    """Walk every row's tree from the root with `rule`; see the module docstring."""
    b, n = tree.batch_size, tree.width
    device = tree.device
    rows = torch.arange(b, device=device)
    children = tree.children_table()  # [B, n + 1, C]
    padded_tokens = torch.nn.functional.pad(tree.tokens, (0, 1), value=-1)  # [:, -1] = no node
    max_depth = int(tree.depths().max()) if n else 0

    current = torch.full((b,), -1, dtype=torch.long, device=device)  # node, -1 = root
    active = torch.ones(b, dtype=torch.bool, device=device)
    num_accepted = torch.zeros(b, dtype=torch.long, device=device)
    path = torch.full((b, max_depth), -1, dtype=torch.long, device=device)
    tokens = torch.full((b, max_depth + 1), -1, dtype=torch.long, device=device)
    bonus_node = torch.full((b,), -1, dtype=torch.long, device=device)

    # Row streams: every draw of the walk at once, [B, depth, lanes] (lane 0: the position's).
    lanes = 1 if rule.shared_draw else 1 + children.shape[2]
    table = generator.uniforms(max_depth + 1, lanes) if isinstance(generator, RowStreams) else None
    for depth in range(max_depth + 1):  # each level accepts one node or ends the row
        draws = table[:, depth] if table is not None else None
        residual = target_probs[rows, current + 1].float()
        if rule.shared_draw:  # one draw for the position: lane 0 for every child and the bonus
            one = draws[:, 0] if draws is not None else _uniform(residual, generator)
            draws = one[:, None].expand(-1, 1 + children.shape[2])
        chosen, residual = _try_children(
            tree, children[rows, current + 1], residual, active, rule, draft_probs, generator, draws
        )
        ending = active & (chosen < 0)
        _write_at(tokens, num_accepted, rule.bonus(residual, _draw(generator, draws, 0)), ending)
        bonus_node = torch.where(ending, current, bonus_node)
        moving = active & (chosen >= 0)
        _write_at(path, num_accepted, chosen, moving)
        _write_at(tokens, num_accepted, padded_tokens[rows, chosen], moving)
        num_accepted = num_accepted + moving.long()
        current = torch.where(moving, chosen, current)
        active = moving
    return Acceptance(num_accepted, path, tokens, bonus_node)


def _try_children(
    tree: DraftTree,
    candidates: Tensor,
    residual: Tensor,
    active: Tensor,
    rule: Rule,
    draft_probs: Tensor | None,
    generator: torch.Generator | RowStreams | None,
    draws: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Offer each row's candidates [B, C] (node indices, -1 = none) in order until one
    is accepted. Returns the accepted node per row (-1 = none) and the residual left
    after the rejections, which is where the bonus comes from when nothing was kept.
    `draws` [B, 1 + C]: this depth's stream uniforms (None: draw from `generator`)."""
    rows = torch.arange(tree.batch_size, device=tree.device)
    chosen = torch.full_like(rows, -1)
    for lane, candidate in enumerate(candidates.unbind(1), start=1):
        trying = active & (chosen < 0) & (candidate >= 0)
        node = candidate.clamp(min=0)
        token = tree.tokens[rows, node]
        q = draft_probs[rows, node].float() if draft_probs is not None else None
        accepted = trying & rule.accept(residual, q, token, _draw(generator, draws, lane))
        chosen = torch.where(accepted, candidate, chosen)
        rejected = (trying & ~accepted)[:, None]
        residual = torch.where(rejected, rule.after_reject(residual, q, token), residual)
    return chosen, residual


# ------------------------------------------------------------------- small tensor helpers


def _at(probs: Tensor, token: Tensor) -> Tensor:
    """probs[b, token[b]] for every row."""
    return probs.gather(1, token[:, None])[:, 0]


def _draw(generator: torch.Generator | RowStreams | None, draws: Tensor | None, lane: int) -> Draw:
    """What one draw of the walk reads: that lane's stream uniforms, else the generator."""
    return draws[:, lane] if draws is not None else generator


def _uniform(like: Tensor, draw: Draw) -> Tensor:
    if isinstance(draw, Tensor):
        return draw
    return torch.rand(like.shape[0], generator=draw, device=like.device)


def _normalise(weights: Tensor, fallback: Tensor) -> Tensor:
    """weights / their sum; rows with no mass keep `fallback` (only reached through
    rounding, when the rejected event had probability ~0)."""
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=1e-30), fallback)


def _sample(probs: Tensor, draw: Draw) -> Tensor:
    """One token per row from unnormalised probs, by inverse CDF (never picks a 0 entry)."""
    return sample_inverse_cdf(probs, _uniform(probs, draw))


def _write_at(target: Tensor, column: Tensor, value: Tensor, where: Tensor) -> None:
    """target[b, column[b]] = value[b] for rows where `where` is True."""
    if target.shape[1] == 0:
        return
    col = column.clamp(max=target.shape[1] - 1)[:, None]
    old = target.gather(1, col)[:, 0]
    target.scatter_(1, col, torch.where(where, value, old)[:, None])


def _choose_rows(pick_first: Tensor, first: Acceptance, second: Acceptance) -> Acceptance:
    """Row-wise merge of two results over the same tree."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        mask = pick_first.reshape(-1, *([1] * (a.dim() - 1)))
        return torch.where(mask, a, b)

    return Acceptance(
        pick(first.num_accepted, second.num_accepted),
        pick(first.path, second.path),
        pick(first.tokens, second.tokens),
        pick(first.bonus_node, second.bonus_node),
    )
