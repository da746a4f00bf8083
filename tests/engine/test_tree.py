"""DraftTree layout (mask, depths, navigation) and the pruned top-n tree builder."""

import pytest
import torch

from respec.engine.tree import DraftTree, TopNTreeBuilder, build_topn_tree


def example_tree() -> DraftTree:
    """Row 0:  root -> 0 -> 2 -> 4      Row 1 (3 valid nodes): root -> 0 -> 1
    -> 1                                         root -> 2
    0 -> 3
    """
    tokens = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
    parents = torch.tensor([[-1, -1, 0, 0, 2], [-1, 0, -1, 1, 3]])  # row 1 slots 3, 4: padding
    return DraftTree.from_parents(tokens, parents, torch.tensor([5, 3]))


def reference_mask(tree: DraftTree) -> torch.Tensor:
    """The mask built one row and one node at a time from path_to."""
    b, n = tree.batch_size, tree.width
    mask = torch.zeros(b, n + 1, n + 1, dtype=torch.bool)
    for row in range(b):
        mask[row, :, 0] = True
        for node in range(n):
            seen = tree.path_to(row, node) if node < tree.num_nodes[row] else [node]
            for other in seen:
                mask[row, node + 1, other + 1] = True
    return mask


def test_chain_layout():
    tree = DraftTree.chain(torch.tensor([[7, 8, 9]]))
    assert tree.parents.tolist() == [[-1, 0, 1]]
    assert tree.depths().tolist() == [[1, 2, 3]]
    assert tree.position_offsets().tolist() == [[0, 1, 2, 3]]
    assert torch.equal(tree.attention_mask()[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.verify_tokens(torch.tensor([6])).tolist() == [[6, 7, 8, 9]]


def test_a_marked_chain_has_the_ancestors_and_mask_of_its_parents():
    """The chain mark's shortcut gives what path doubling gives, padding included."""
    tokens = torch.arange(12).reshape(3, 4)
    marked = DraftTree.chain(tokens, torch.tensor([4, 2, 0]))
    plain = DraftTree.from_parents(marked.tokens, marked.parents, marked.num_nodes)
    assert marked.is_chain() and not plain.is_chain()
    assert torch.equal(marked.ancestors(), plain.ancestors())
    assert torch.equal(marked.attention_mask(), plain.attention_mask())


def test_example_tree_navigation():
    tree = example_tree()
    assert tree.depths().tolist() == [[1, 1, 2, 2, 3], [1, 2, 1, 0, 0]]
    assert tree.children_of(0, -1) == [0, 1]
    assert tree.children_of(0, 0) == [2, 3]
    assert tree.children_of(1, 1) == []  # node 3 of row 1 is padding
    assert tree.path_to(0, 4) == [0, 2, 4]
    assert tree.path_to(1, 1) == [0, 1]
    assert tree.path_to(0, -1) == []
    table = tree.children_table()
    assert table[0, 0].tolist() == [0, 1] and table[0, 1].tolist() == [2, 3]
    assert table[0, 3].tolist() == [4, -1]
    assert table[1, 0].tolist() == [0, 2] and table[1, 2].tolist() == [-1, -1]


def test_example_tree_mask():
    mask = example_tree().attention_mask().int()
    assert mask[0].tolist() == [
        [1, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0],  # node 0
        [1, 0, 1, 0, 0, 0],  # node 1
        [1, 1, 0, 1, 0, 0],  # node 2 under node 0
        [1, 1, 0, 0, 1, 0],  # node 3 under node 0
        [1, 1, 0, 1, 0, 1],  # node 4 under node 2
    ]
    # Padding slots see only the root and themselves; nobody sees them.
    assert mask[1, 4].tolist() == [1, 0, 0, 0, 1, 0]
    assert mask[1, :, 4].tolist() == [0, 0, 0, 0, 1, 0]


def random_tree(gen: torch.Generator, batch: int, n: int) -> DraftTree:
    index = torch.arange(n).float()
    parents = (torch.rand(batch, n, generator=gen) * (index + 1)).long() - 1  # in [-1, i-1]
    tokens = torch.randint(0, 50, (batch, n), generator=gen)
    num_nodes = torch.randint(0, n + 1, (batch,), generator=gen)
    return DraftTree.from_parents(tokens, parents, num_nodes)


def test_random_trees_match_reference():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        tree = random_tree(gen, batch=4, n=9)
        assert torch.equal(tree.attention_mask(), reference_mask(tree))
        depth = tree.depths()
        table = tree.children_table()
        for row in range(tree.batch_size):
            for node in range(int(tree.num_nodes[row])):
                assert depth[row, node] == len(tree.path_to(row, node))
            for position in range(tree.width + 1):
                listed = [c for c in table[row, position].tolist() if c >= 0]
                assert listed == tree.children_of(row, position - 1)


def test_bad_parents_are_rejected():
    with pytest.raises(ValueError):
        DraftTree.from_parents(torch.tensor([[1, 2]]), torch.tensor([[-1, 1]]))
    with pytest.raises(ValueError):
        DraftTree.from_parents(torch.tensor([[1, 2]]), torch.tensor([[-2, 0]]))


def test_empty_tree_is_plain_decoding():
    tree = DraftTree.empty(3)
    assert tree.attention_mask().shape == (3, 1, 1)
    assert tree.children_table().shape == (3, 1, 0)
    assert tree.depths().shape == (3, 0)


# ---------------------------------------------------------------- the top-n builder


def test_builder_hand_example():
    root = torch.tensor([[0.50, 0.32, 0.13, 0.05]])
    after = {0: [0.10, 0.60, 0.20, 0.10], 1: [0.70, 0.20, 0.06, 0.04]}

    def next_probs(builder: TopNTreeBuilder) -> torch.Tensor:
        return torch.tensor([[after[t] for t in builder.frontier_tokens()[0].tolist()]])

    # Pool: 0 (.5), 1 (.32), 0->1 (.30), 0->2 (.10), 1->0 (.224), 1->1 (.064); keep 4.
    tree = build_topn_tree(root, next_probs, steps=2, branch=2, num_draft=4)
    assert tree.tokens.tolist() == [[0, 1, 1, 0]]
    assert tree.parents.tolist() == [[-1, -1, 0, 1]]


def cumulative_probs(tree: DraftTree, row: int, root_q, q_after) -> list[float]:
    """Product of the draft probabilities along each node's path."""
    out = []
    for node in range(int(tree.num_nodes[row])):
        prob, dist = 1.0, root_q
        for step in tree.path_to(row, node):
            token = int(tree.tokens[row, step])
            prob *= float(dist[token])
            dist = q_after[token]
        out.append(prob)
    return out


@pytest.mark.parametrize("steps,branch,num_draft", [(3, 2, 6), (4, 3, 10), (4, 1, 8), (3, 3, 50)])
def test_builder_keeps_the_most_probable_nodes(steps, branch, num_draft):
    gen = torch.Generator().manual_seed(steps * 10 + branch)
    vocab, batch = 7, 5
    q_after = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 2, -1)  # Markov drafter
    root_q = torch.softmax(torch.randn(batch, vocab, generator=gen) * 2, -1)
    builder = TopNTreeBuilder(root_q, branch)
    for _ in range(steps - 1):
        builder.expand(q_after[builder.frontier_tokens()])
    pool = builder.pool_tree()
    assert pool.width == branch + (steps - 1) * branch * branch
    tree = builder.finish(num_draft)
    assert tree.width == min(num_draft, pool.width)
    tree.check()  # parents before children
    for row in range(batch):
        kept = cumulative_probs(tree, row, root_q[row], q_after)
        everything = cumulative_probs(pool, row, root_q[row], q_after)
        best = sorted(everything, reverse=True)[: tree.width]
        assert sorted(kept, reverse=True) == pytest.approx(best, rel=1e-5)
        for node in range(tree.width):  # each token is among the top-t of its parent's q
            parent = int(tree.parents[row, node])
            dist = root_q[row] if parent < 0 else q_after[tree.tokens[row, parent]]
            assert tree.tokens[row, node] in dist.topk(branch).indices
        siblings = tree.children_of(row, -1)
        tokens = [int(tree.tokens[row, s]) for s in siblings]
        assert len(set(tokens)) == len(tokens)  # distinct candidates


def test_branch_one_is_the_argmax_chain():
    q_after = torch.eye(5).roll(1, dims=1) * 0.6 + 0.1  # argmax after token k is k + 1
    tree = build_topn_tree(q_after[[0]], lambda b: q_after[b.frontier_tokens()], 4, 1, 4)
    assert tree.tokens.tolist() == [[1, 2, 3, 4]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2]]
