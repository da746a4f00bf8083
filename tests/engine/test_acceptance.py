"""Acceptance rules: exact greedy behaviour and statistical exactness of the sampled rules.

The statistical tests use a toy language: a first-order Markov "target" T and a
different Markov "draft" Q over V = 5 tokens (row START is the empty prefix). Many
independent rows each run speculative steps until they have two output tokens; the
empirical joint of (x1, x2) must match T[START, x1] * T[x1, x2] (chi-square). The
same test, run on deliberately broken rules, must fail. Each runs with the acceptance
draws taken from a torch.Generator and from per-row counter-based streams (RowStreams,
what the engine uses: row r's draws at its position p are u(key_r, p, lane)).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from respec.engine import acceptance
from respec.engine.acceptance import (
    Acceptance,
    accept,
    accept_deterministic,
    accept_greedy,
    accept_sampled,
    output_logprobs,
)
from respec.engine.sampling import RowStreams, stream_key
from respec.engine.tree import DraftTree, build_topn_tree
from tests.engine.stats import chi_square_pvalue, pair_counts

V = 5
START = V  # Markov state of the empty prefix
ROWS = 40_000


def markov_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target T and draft Q, float [V + 1, V]; every entry >= 0.02 so all cells are visited."""
    gen = torch.Generator().manual_seed(seed)

    def table() -> torch.Tensor:
        raw = torch.softmax(torch.randn(V + 1, V, generator=gen) * 1.5, -1)
        return 0.9 * raw + 0.1 / V

    return table(), table()


# ---------------------------------------------------------------- drafting styles


def sample_rows(probs: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """long [M, count]: i.i.d. draws from each row of probs [M, V]."""
    return torch.multinomial(probs, count, replacement=True, generator=gen)


def sampled_tree(state, draft, gen, widths: list[int]) -> DraftTree:
    """A full tree whose depth-d nodes each get widths[d] children drawn i.i.d. from Q."""
    tokens, parents, layer, layer_tokens = [], [], [-1], state[:, None]
    for width in widths:
        new_layer, new_tokens = [], []
        for k, parent in enumerate(layer):
            children = sample_rows(draft[layer_tokens[:, k]], width, gen)
            for j in range(width):
                new_layer.append(len(tokens))
                tokens.append(children[:, j])
                parents.append(parent)
                new_tokens.append(children[:, j])
        layer, layer_tokens = new_layer, torch.stack(new_tokens, 1)
    tokens = torch.stack(tokens, 1)
    return DraftTree.from_parents(tokens, torch.tensor(parents).expand_as(tokens))


def draft(style: str, state: torch.Tensor, draft_q: torch.Tensor, gen: torch.Generator):
    """(tree, sampled?) for one speculative step of every row in `state`."""
    if style == "chain_sampled":
        return sampled_tree(state, draft_q, gen, [1, 1, 1]), True
    if style == "tree_sampled":
        return sampled_tree(state, draft_q, gen, [2, 2]), True
    if style == "tree_sampled_ragged":  # truncated by index, not by value: still exact
        tree = sampled_tree(state, draft_q, gen, [3, 2])
        num_nodes = torch.randint(0, tree.width + 1, (len(state),), generator=gen)
        return DraftTree.from_parents(tree.tokens, tree.parents, num_nodes), True
    if style in ("tree_topt", "tree_topt_pruned", "chain_argmax"):
        branch, num_draft = {"tree_topt": (2, 6), "tree_topt_pruned": (2, 4)}.get(style, (1, 3))
        steps = 2 if branch == 2 else 3
        tree = build_topn_tree(
            draft_q[state], lambda b: draft_q[b.frontier_tokens()], steps, branch, num_draft
        )
        return tree, False
    raise ValueError(style)


def speculative_step(style, state, target, draft_q, gen, draws=None) -> Acceptance:
    """Drafts from `gen`; acceptance draws from `draws` (RowStreams) when given, else `gen`."""
    tree, sampled = draft(style, state, draft_q, gen)
    context = torch.cat([state[:, None], tree.tokens], 1)  # token at each verification position
    target_probs = target[context]
    draws = gen if draws is None else draws
    if not sampled:
        return accept_deterministic(tree, target_probs, draws)
    parent_context = context.gather(1, tree.parents + 1)  # the q each node was drawn from
    return accept_sampled(tree, target_probs, draft_q[parent_context], draws)


def first_two_tokens(style: str, seed: int, rows: int = ROWS, draws: str = "generator") -> torch.Tensor:
    """long [rows, 2]: the first two generated tokens of independent rows. draws="streams":
    acceptance draws from each row's own stream at its position (the engine's way)."""
    target, draft_q = markov_tables(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    keys = torch.tensor([stream_key(seed, f"row/{r}") for r in range(rows)])
    out = torch.full((rows, 2), -1, dtype=torch.long)
    have = torch.zeros(rows, dtype=torch.long)
    state = torch.full((rows,), START, dtype=torch.long)
    while bool((have < 2).any()):
        todo = (have < 2).nonzero()[:, 0]
        streams = RowStreams(keys[todo], have[todo]) if draws == "streams" else None
        result = speculative_step(style, state[todo], target, draft_q, gen, streams)
        for k in range(2):  # output token k lands in slot have + k if it exists and fits
            slot = have[todo] + k
            fits = (k < result.num_tokens) & (slot < 2)
            out[todo[fits], slot[fits]] = result.tokens[fits, k]
        last = result.tokens.gather(1, result.num_accepted[:, None])[:, 0]
        state[todo] = last  # order-1 Markov: the last token is the whole state
        have[todo] += result.num_tokens
    return out


def exact_joint(seed: int) -> torch.Tensor:
    target, _ = markov_tables(seed)
    return target[START][:, None] * target[:V]


EXACT_STYLES = [
    "chain_sampled",
    "chain_argmax",
    "tree_topt",
    "tree_topt_pruned",
    "tree_sampled",
    "tree_sampled_ragged",
]


@pytest.mark.parametrize("draws", ["generator", "streams"])
@pytest.mark.parametrize("style", EXACT_STYLES)
def test_output_distribution_is_the_targets(style, draws):
    seed = 11
    tokens = first_two_tokens(style, seed, draws=draws)
    _, pvalue = chi_square_pvalue(pair_counts(tokens[:, 0], tokens[:, 1], V), exact_joint(seed))
    assert pvalue > 1e-3, f"{style}: p-value {pvalue:.2e}"


def _always_accept(r, q, token, gen):
    return torch.ones_like(token, dtype=torch.bool)


def _keep_residual(r, q, token):
    return r  # the bug: forget what was rejected, resample from p itself


def _zero_without_renormalising(r, q, token):
    return r.scatter(1, token[:, None], 0.0)  # the bug: later siblings see p(c), not p(c)/(1-...)


def _accept_with_a_draw_of_its_own(r, q, token, draw):
    """The bug: the deterministic rule's child check with a fresh uniform, not the position's
    (the bonus, drawn with the position's, can then repeat a rejected child)."""
    return acceptance._sample(r, torch.rand(r.shape[0])) == token


BROKEN = [
    ("chain_sampled", "SAMPLED", "accept", _always_accept, "generator"),
    ("chain_sampled", "SAMPLED", "after_reject", _keep_residual, "generator"),
    ("tree_sampled", "SAMPLED", "after_reject", _keep_residual, "generator"),
    ("tree_topt", "DETERMINISTIC", "accept", _always_accept, "generator"),
    ("tree_topt", "DETERMINISTIC", "accept", _accept_with_a_draw_of_its_own, "generator"),
    ("tree_topt", "DETERMINISTIC", "after_reject", _zero_without_renormalising, "generator"),
    ("chain_sampled", "SAMPLED", "after_reject", _keep_residual, "streams"),
    ("tree_topt", "DETERMINISTIC", "after_reject", _zero_without_renormalising, "streams"),
    ("chain_argmax", "DETERMINISTIC", "accept", _accept_with_a_draw_of_its_own, "streams"),
]


@pytest.mark.parametrize("style,rule,part,broken,draws", BROKEN, ids=lambda x: getattr(x, "__name__", x))
def test_broken_rules_fail_the_same_test(monkeypatch, style, rule, part, broken, draws):
    bad_rule = dataclasses.replace(getattr(acceptance, rule), **{part: broken})
    monkeypatch.setattr(acceptance, rule, bad_rule)
    seed = 11
    tokens = first_two_tokens(style, seed, draws=draws)
    _, pvalue = chi_square_pvalue(pair_counts(tokens[:, 0], tokens[:, 1], V), exact_joint(seed))
    assert pvalue < 1e-6, f"broken {rule}.{part} on {style} went unnoticed: p = {pvalue:.2e}"


# ---------------------------------------------------------------- greedy


def reference_greedy(tree: DraftTree, scores: torch.Tensor, row: int) -> tuple[list[int], int]:
    """(accepted path, bonus) by walking one row in plain Python."""
    path, node = [], -1
    while True:
        best = int(scores[row, node + 1].argmax())
        match = [c for c in tree.children_of(row, node) if int(tree.tokens[row, c]) == best]
        if not match:
            return path, best
        node = match[0]
        path.append(node)


def check_greedy(tree: DraftTree, scores: torch.Tensor) -> None:
    result = accept_greedy(tree, scores)
    for row in range(tree.batch_size):
        path, bonus = reference_greedy(tree, scores, row)
        k = len(path)
        assert result.num_accepted[row] == k
        assert result.path[row, :k].tolist() == path
        assert (result.path[row, k:] == -1).all()
        assert result.tokens[row, :k].tolist() == [int(tree.tokens[row, i]) for i in path]
        assert result.tokens[row, k] == bonus and (result.tokens[row, k + 1 :] == -1).all()
        assert result.bonus_node[row] == (path[-1] if path else -1)


def test_greedy_chain_exhaustive():
    """Every draft chain of length 3 over 3 tokens, against random targets."""
    gen = torch.Generator().manual_seed(0)
    drafts = torch.cartesian_prod(*[torch.arange(3)] * 3)  # [27, 3]
    for _ in range(20):
        scores = torch.randn(1, 4, 3, generator=gen).expand(len(drafts), 4, 3)
        tree = DraftTree.chain(drafts)
        check_greedy(tree, scores)
        argmax = scores[0].argmax(-1)
        matches = (drafts == argmax[:3]).long().cumprod(1).sum(1)  # longest matching prefix
        assert torch.equal(accept_greedy(tree, scores).num_accepted, matches)


def test_greedy_random_trees():
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        batch, n, vocab = 8, 7, 3
        index = torch.arange(n).float()
        parents = (torch.rand(batch, n, generator=gen) * (index + 1)).long() - 1
        tokens = torch.randint(0, vocab, (batch, n), generator=gen)
        num_nodes = torch.randint(0, n + 1, (batch,), generator=gen)
        tree = DraftTree.from_parents(tokens, parents, num_nodes)
        check_greedy(tree, torch.randn(batch, n + 1, vocab, generator=gen))


def test_greedy_fast_path_equals_the_walk():
    """accept_greedy judges all nodes at once; it must return the walk's tensors exactly
    (shapes included), also for duplicate siblings, padding and empty trees."""
    gen = torch.Generator().manual_seed(4)
    for n in (0, 1, 4, 7):
        for _ in range(20):
            batch, vocab = 6, 3
            index = torch.arange(n).float()
            parents = (torch.rand(batch, n, generator=gen) * (index + 1)).long() - 1
            tokens = torch.randint(0, vocab, (batch, n), generator=gen)
            num_nodes = torch.randint(0, n + 1, (batch,), generator=gen)
            tree = DraftTree.from_parents(tokens, parents, num_nodes)
            scores = torch.randn(batch, n + 1, vocab, generator=gen)
            fast, walked = accept_greedy(tree, scores), acceptance.walk_tree(tree, scores, acceptance.GREEDY)
            for field in dataclasses.fields(Acceptance):
                assert torch.equal(getattr(fast, field.name), getattr(walked, field.name)), field.name


def test_greedy_chain_path_equals_the_walk():
    """A tree marked as a chain takes its own shortcut; the walk's tensors exactly, with
    trailing padding, empty chains and chains nothing of which matches."""
    gen = torch.Generator().manual_seed(5)
    for n in (1, 3, 6):
        for _ in range(20):
            batch, vocab = 6, 2
            tokens = torch.randint(0, vocab, (batch, n), generator=gen)
            tree = DraftTree.chain(tokens, torch.randint(0, n + 1, (batch,), generator=gen))
            assert tree.is_chain()
            scores = torch.randn(batch, n + 1, vocab, generator=gen)
            fast, walked = accept_greedy(tree, scores), acceptance.walk_tree(tree, scores, acceptance.GREEDY)
            for field in dataclasses.fields(Acceptance):
                assert torch.equal(getattr(fast, field.name), getattr(walked, field.name)), field.name


def test_greedy_speculation_reproduces_greedy_decoding():
    """Many greedy steps with a top-t tree emit exactly the target's greedy sequence."""
    for seed in range(5):
        target, draft_q = markov_tables(seed)
        expected, token = [], START
        for _ in range(30):
            token = int(target[token].argmax())
            expected.append(token)
        produced, state = [], torch.tensor([START])
        while len(produced) < 30:

            def expand(builder, q=draft_q):
                return q[builder.frontier_tokens()]

            tree = build_topn_tree(draft_q[state], expand, 3, 2, 5)
            context = torch.cat([state[:, None], tree.tokens], 1)
            result = accept_greedy(tree, target[context])
            produced += result.tokens[0, : int(result.num_tokens[0])].tolist()
            state = result.tokens[:, int(result.num_accepted[0])]
        assert produced[:30] == expected


# ---------------------------------------------------------------- plumbing


def test_plain_decoding_samples_from_the_root():
    probs = torch.tensor([[0.0, 1.0, 0.0]]).expand(4, 1, 3)
    result = accept_deterministic(DraftTree.empty(4), probs, torch.Generator().manual_seed(0))
    assert result.num_accepted.tolist() == [0] * 4
    assert result.tokens.tolist() == [[1]] * 4
    assert result.bonus_node.tolist() == [-1] * 4


def test_certain_drafts_are_all_accepted_and_logprobs_line_up():
    """A target that is one-hot on the drafts accepts everything under every rule."""
    drafts = torch.tensor([[2, 0, 1]])
    tree = DraftTree.chain(drafts)
    target = torch.full((1, 4, 3), 1e-9)
    target[0, torch.arange(3), drafts[0]] = 1.0
    target[0, 3, 2] = 1.0
    target = target / target.sum(-1, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    for result in (
        accept_greedy(tree, target),
        accept_deterministic(tree, target, gen),
        accept_sampled(tree, target, target[:, :3], gen),
    ):
        assert result.tokens.tolist() == [[2, 0, 1, 2]]
        assert result.path.tolist() == [[0, 1, 2]] and result.bonus_node.tolist() == [2]
        assert result.source_positions().tolist() == [[0, 1, 2, 3]]
        assert output_logprobs(target, result).abs().max() < 1e-6


def test_mixed_greedy_rows():
    gen = torch.Generator().manual_seed(5)
    scores = torch.softmax(torch.randn(6, 4, 5, generator=gen), -1)
    tree = DraftTree.chain(torch.randint(0, 5, (6, 3), generator=gen))
    greedy_rows = torch.tensor([True, False, True, False, True, False])
    mixed = accept(tree, scores, greedy=greedy_rows, generator=gen)
    greedy = accept_greedy(tree, scores)
    assert torch.equal(mixed.tokens[greedy_rows], greedy.tokens[greedy_rows])
