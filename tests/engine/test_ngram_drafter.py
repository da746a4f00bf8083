"""The drafter interface (DraftShape, DraftRequest, DraftProposal) and the n-gram drafter:
exact chains and trees on hand-made histories, and greedy speculative decoding with it
that reproduces plain greedy decoding of a toy target token for token."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from respec.engine.acceptance import accept_greedy
from respec.engine.drafters import (
    Drafter,
    DraftProposal,
    DraftRequest,
    DraftShape,
    NgramDrafter,
)
from respec.engine.drafters.ngram import find_suffix_matches
from respec.engine.tree import DraftTree


def propose(histories: list[list[int]], shape: str, **ngram) -> DraftTree:
    request = DraftRequest(
        histories=[torch.tensor(h, dtype=torch.long) for h in histories],
        features=None,
        rows=list(range(len(histories))),
        shape=DraftShape.parse(shape),
    )
    proposal = NgramDrafter(**ngram).propose(request)
    assert proposal.draft_probs is None and proposal.acceptance_rule == "deterministic"
    return proposal.tree


def row(tree: DraftTree, b: int = 0) -> tuple[list[int], list[int]]:
    """(tokens, parents) of row b's valid nodes."""
    count = int(tree.num_nodes[b])
    return tree.tokens[b, :count].tolist(), tree.parents[b, :count].tolist()


# ---------------------------------------------------------------- DraftShape


def test_shape_name_and_parse_round_trip():
    shape = DraftShape(3, 1, 3)
    assert shape.name == "s3_t1_n3" and shape.is_chain
    assert DraftShape.parse("s3_t1_n3") == shape
    assert DraftShape.parse("s4_t2_n30").max_nodes == 2 + 4 + 8 + 16
    assert DraftShape.chain(5) == DraftShape(5, 1, 5)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 1, 1), "steps must be >= 1"),
        ((2, 0, 1), "branch must be >= 1"),
        ((2, 2, 0), "num_draft must be >= 1"),
        ((3, 1, 4), "num_draft=4 exceeds the 3 nodes"),
        ((2, 2, 7), "num_draft=7 exceeds the 6 nodes"),
        ((2.0, 1, 1), "steps must be an int"),
        ((True, 1, 1), "steps must be an int"),
    ],
)
def test_shape_validation(args, message):
    with pytest.raises(ValueError, match=message):
        DraftShape(*args)


@pytest.mark.parametrize("name", ["s3_t1", "s3t1n3", "s3_t1_n3x", "sa_t1_n1", "s-1_t1_n1"])
def test_shape_parse_rejects_bad_names(name):
    with pytest.raises(ValueError, match="is not of the form"):
        DraftShape.parse(name)


def test_shape_parse_reports_bad_values():
    with pytest.raises(ValueError, match="exceeds"):
        DraftShape.parse("s2_t1_n3")


# ---------------------------------------------------------------- request / proposal / base


def test_request_checks_rows_and_features():
    history = torch.tensor([1, 2, 3])
    shape = DraftShape.chain(2)
    with pytest.raises(ValueError, match="2 histories but 1 row ids"):
        DraftRequest([history, history], None, [0], shape)
    with pytest.raises(ValueError, match="features have 3 rows"):
        DraftRequest([history], torch.zeros(3, 8), [0], shape)
    with pytest.raises(ValueError, match="must be 1-D"):
        DraftRequest([history[None]], None, [0], shape)


def test_proposal_rule_and_draft_probs_shape():
    tree = DraftTree.chain(torch.tensor([[4, 5]]))
    assert DraftProposal(tree).acceptance_rule == "deterministic"
    q = torch.full((1, 2, 8), 1 / 8)
    assert DraftProposal(tree, q).acceptance_rule == "sampled"
    with pytest.raises(ValueError, match=r"draft_probs must be \[B=1, n=2, V\]"):
        DraftProposal(tree, torch.full((1, 3, 8), 1 / 8))


def test_drafter_hooks_default_to_no_ops():
    class Fixed(Drafter):
        def propose(self, request: DraftRequest) -> DraftProposal:
            return DraftProposal(DraftTree.empty(request.batch_size))

    drafter = Fixed()
    assert drafter.needs_features is False and NgramDrafter.needs_features is False
    drafter.reset_row(3)
    drafter.release_row(3)
    drafter.load_weights({}, version=1)
    with pytest.raises(TypeError):
        Drafter()  # propose is abstract


# ---------------------------------------------------------------- chains


def test_chain_follows_the_match():
    # "1 2 3" occurred at positions 0..2, followed by 4 1 2.
    assert row(propose([[1, 2, 3, 4, 1, 2, 3]], "s3_t1_n3")) == ([4, 1, 2], [-1, 0, 1])


def test_chain_is_cut_to_n_and_padded_to_width():
    tree = propose([[1, 2, 3, 4, 1, 2, 3]], "s3_t1_n2")
    assert row(tree) == ([4, 1], [-1, 0]) and tree.width == 2


def test_most_recent_match_wins_among_equally_long_ones():
    # "5" occurred at 0 (then 7) and at 2 (then 8): the later one is drafted.
    assert row(propose([[5, 7, 5, 8, 5]], "s2_t1_n2"))[0] == [8, 5]


def test_longest_suffix_wins_over_a_more_recent_shorter_one():
    history = [1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3]
    # "1 2 3" (k = 3) occurred only at 0..2, followed by 9; "2 3" also at 5..6, then 8.
    assert row(propose([history], "s1_t1_n1"))[0] == [9]
    assert row(propose([history], "s1_t1_n1", max_n=2))[0] == [8]


def test_min_n_rejects_short_matches():
    history = [5, 7, 5, 8, 5]  # only the 1-token suffix "5" recurs
    assert int(propose([history], "s2_t1_n2", min_n=2).num_nodes[0]) == 0
    assert int(propose([history], "s2_t1_n2", min_n=1).num_nodes[0]) == 2


def test_continuation_repeats_a_short_loop_past_the_end():
    # The match "1 2" is two tokens back: the draft keeps the loop going for s tokens.
    assert row(propose([[1, 2, 1, 2]], "s5_t1_n5"))[0] == [1, 2, 1, 2, 1]
    # A run of one token: the longest earlier match is one token back, period 1.
    assert row(propose([[7, 7, 7]], "s4_t1_n4"))[0] == [7, 7, 7, 7]


def test_rows_without_match_get_zero_nodes():
    tree = propose([[1, 2, 3, 4], [1, 2, 1], [], [6]], "s3_t1_n3")
    assert tree.num_nodes.tolist() == [0, 3, 0, 0]
    assert row(tree, 1) == ([2, 1, 2], [-1, 0, 1])
    assert tree.width == 3 and tree.batch_size == 4


# ---------------------------------------------------------------- trees


def test_tree_siblings_are_distinct_and_most_recent_first():
    # "9" was followed by 1, 2, 3 (oldest to newest); t = 2 keeps the two latest.
    tree = propose([[9, 1, 9, 2, 9, 3, 9]], "s1_t2_n2")
    assert row(tree) == ([3, 2], [-1, -1])


def test_tree_merges_matches_with_the_same_next_token():
    # "3" recurs at 0, 2, 4; continuations (overlap-copied, s = 3):
    #   from 4: 2 3 2     from 2: 1 3 2     from 0: 1 3 1
    # Trie (support): 2(1) -> 3(1) -> 2(1);  1(2) -> 3(2) -> {2(1), 1(1)}
    history = [3, 1, 3, 1, 3, 2, 3]
    tree = propose([history], "s3_t2_n7")
    assert row(tree) == ([2, 3, 2, 1, 3, 2, 1], [-1, 0, 1, -1, 3, 4, 4])
    for node in [-1, *range(int(tree.num_nodes[0]))]:
        children = tree.tokens[0, tree.children_of(0, node)].tolist()
        assert len(children) == len(set(children)) <= 2


def test_tree_pruned_to_n_keeps_best_supported_nodes_parents_first():
    history = [3, 1, 3, 1, 3, 2, 3]  # the trie of the test above
    # Support 2: "1", "1 3"; then ties go to the earlier (most recent) nodes "2", "2 3".
    tree = propose([history], "s3_t2_n4")
    assert row(tree) == ([2, 3, 1, 3], [-1, 0, -1, 2])
    tree = propose([history], "s3_t2_n2")
    assert row(tree) == ([1, 3], [-1, 0])
    tree.check()  # parents before children


def test_chain_shape_takes_the_most_recent_match_of_that_tree():
    assert row(propose([[3, 1, 3, 1, 3, 2, 3]], "s3_t1_n3")) == ([2, 3, 2], [-1, 0, 1])


def test_branch_limit_applies_below_the_root_too():
    # "0" followed by 1 x / 1 y / 1 z: one child "1" whose children are the latest t.
    history = [0, 1, 4, 0, 1, 5, 0, 1, 6, 0]
    tree = propose([history], "s2_t2_n6")
    assert row(tree) == ([1, 6, 5], [-1, 0, 0])


def test_long_history_stays_fast():
    # Quadratic scans over 200k tokens would take minutes; one pass per k takes ms.
    gen = torch.Generator().manual_seed(0)
    varied = torch.randint(0, 4, (200_000,), generator=gen).tolist()
    run = [7] * 200_000
    start = time.perf_counter()
    tree = propose([varied, run], "s4_t3_n16")
    assert time.perf_counter() - start < 5.0
    assert tree.num_nodes.tolist()[1] == 4  # the run only ever continues with 7
    assert int(tree.num_nodes[0]) == 16


# ---------------------------------------------------------------- end to end with acceptance

V = 512
Target = Callable[[list[int]], int]


def fibonacci_mod_10(history: list[int]) -> int:
    """Next = sum of the last two mod 10: eventually periodic (period 60), and the last
    token alone does not determine the next, so 1-gram drafts are often wrong."""
    return (history[-1] + history[-2]) % 10


def phrase_loop(history: list[int]) -> int:
    """A fixed 8-token phrase with repeated tokens, on loop (by position)."""
    return [1, 2, 1, 3, 1, 2, 1, 4][len(history) % 8]


def counting(history: list[int]) -> int:
    """Never repeats within the test: the drafter never finds a match."""
    return len(history) + 20


TARGETS: list[Target] = [fibonacci_mod_10, phrase_loop, counting]
PROMPTS = [[1, 1], [1, 2, 1], [20]]


def plain_greedy(target: Target, prompt: list[int], count: int) -> list[int]:
    history = list(prompt)
    for _ in range(count):
        history.append(target(history))
    return history[len(prompt) :]


def target_probs_over_tree(
    histories: list[list[int]], targets: list[Target], tree: DraftTree
) -> torch.Tensor:
    """One-hot [B, n + 1, V] of each row's toy target after the root and after each node's path."""
    probs = torch.zeros(tree.batch_size, tree.width + 1, V)
    for b, (history, target) in enumerate(zip(histories, targets, strict=True)):
        probs[b, 0, target(history)] = 1.0
        for node in range(tree.width):
            path = tree.tokens[b, tree.path_to(b, node)].tolist()
            probs[b, node + 1, target(history + path)] = 1.0  # padding: anything is fine
    return probs


def speculative_greedy(shape: str, count: int, use_proposal_rule: bool):
    """Decode each row until it has `count` new tokens, dropping finished rows from the
    batch (row ids stay stable). Returns each row's new tokens and accepted counts per step."""
    drafter = NgramDrafter(min_n=1, max_n=4)
    histories = [list(p) for p in PROMPTS]
    accepted: list[list[int]] = [[] for _ in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    active = list(range(len(PROMPTS)))
    while active:
        batch = [histories[r] for r in active]
        request = DraftRequest(
            [torch.tensor(h) for h in batch], None, active, DraftShape.parse(shape)
        )
        proposal = drafter.propose(request)
        target = target_probs_over_tree(batch, [TARGETS[r] for r in active], proposal.tree)
        if use_proposal_rule:  # the deterministic rule; with a one-hot target it is exact too
            result = proposal.accept(target, generator=generator)
        else:
            result = accept_greedy(proposal.tree, target)
        for b, r in enumerate(active):
            histories[r].extend(result.tokens[b, : int(result.num_tokens[b])].tolist())
            accepted[r].append(int(result.num_accepted[b]))
        active = [r for r in active if len(histories[r]) - len(PROMPTS[r]) < count]
    generated = [h[len(p) : len(p) + count] for h, p in zip(histories, PROMPTS, strict=True)]
    return generated, accepted


@pytest.mark.parametrize("shape", ["s4_t1_n4", "s4_t2_n8", "s6_t3_n12"])
@pytest.mark.parametrize("use_proposal_rule", [False, True])
def test_speculative_decoding_with_ngram_drafts_equals_plain_greedy(shape, use_proposal_rule):
    count = 240
    generated, accepted = speculative_greedy(shape, count, use_proposal_rule)
    for tokens, target, prompt in zip(generated, TARGETS, PROMPTS, strict=True):
        assert tokens == plain_greedy(target, prompt, count)
    fibonacci, phrase, never = (sum(a) / len(a) for a in accepted)
    assert fibonacci > 1.0  # nothing right in the first period (60 tokens), all right after
    assert phrase > 1.0  # partly right until the phrase has been seen whole
    assert never == 0.0  # no match ever: plain decoding


def naive_suffix_matches(history: list[int], min_n: int, max_n: int) -> list[int]:
    """The definition, checked one k and one position at a time (quadratic, for tests)."""
    for k in range(max_n, min_n - 1, -1):
        suffix = history[len(history) - k :] if k <= len(history) else None
        ends = [
            j
            for j in range(len(history) - 2, k - 2, -1)
            if suffix is not None and history[j - k + 1 : j + 1] == suffix
        ]
        if ends:
            return ends
    return []


def test_match_finder_agrees_with_the_definition_on_random_histories():
    gen = torch.Generator().manual_seed(1)
    for trial in range(300):
        length = int(torch.randint(0, 40, (), generator=gen))
        vocab = 2 + trial % 4
        history = torch.randint(0, vocab, (length,), generator=gen)
        min_n, max_n = [(1, 4), (2, 3), (1, 1), (3, 5)][trial % 4]
        found = find_suffix_matches(history, min_n, max_n).tolist()
        assert found == naive_suffix_matches(history.tolist(), min_n, max_n), history.tolist()
