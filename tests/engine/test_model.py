"""The decoder equals transformers' Qwen2 / Llama, and every cached way of running it
(token-by-token decode, rows at different lengths, draft-tree verification, commit of the
accepted path) gives the logits of the plain causal pass."""

from __future__ import annotations

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.errors import SequenceTooLongError
from respec.engine.kv_cache import KVCache
from respec.engine.tree import DraftTree

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 97
TOLERANCE = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------- equal to transformers


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("qwen2", {}),  # GQA, untied, q/k/v biases
        ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
        ("llama", {"num_key_value_heads": 4}),  # plain multi-head attention
        ("llama", {"rope_scaling": LLAMA3, "attention_bias": True, "mlp_bias": True}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500000.0}),
        ("llama", {"head_dim": 32, "tie_word_embeddings": True}),  # head_dim != hidden / heads
    ],
    ids=["qwen2-gqa", "qwen2-tied-mqa", "llama-mha", "llama3-rope-bias", "llama-linear-rope", "llama-head-dim"],
)
def test_logits_equal_transformers(hf_checkpoint, family, overrides):
    reference, directory = hf_checkpoint(family, **overrides)
    ours = load_model(directory)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(tokens).logits, reference(tokens).logits) < TOLERANCE


def test_sharded_checkpoint_equals_transformers(hf_checkpoint):
    reference, directory = hf_checkpoint("llama", shard_size="60KB", rope_scaling=LLAMA3)
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    tokens = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert max_diff(load_model(directory)(tokens).logits, reference(tokens).logits) < TOLERANCE


def test_captured_layers_and_last_hidden_equal_transformers_hidden_states(hf_checkpoint):
    reference, directory = hf_checkpoint("qwen2")
    ours = load_model(directory)
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        # HF: [embeddings, after layer 0, after layer 1, final norm of layer 2's output]
        want = reference(tokens, output_hidden_states=True).hidden_states
        got = ours(tokens, capture_layers=(1, 0, 2))
        assert max_diff(got.captured[0], want[2]) < TOLERANCE
        assert max_diff(got.captured[1], want[1]) < TOLERANCE
        assert max_diff(got.last_hidden, want[3]) < TOLERANCE
        assert max_diff(ours.model.norm(got.captured[2]), got.last_hidden) == 0
        assert max_diff(ours.compute_logits(got.last_hidden), got.logits) == 0


def test_right_padding_leaves_each_row_as_if_alone(tiny_model):
    short, long = torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (9,))
    tokens = torch.stack([torch.cat([short, torch.zeros(4, dtype=torch.long)]), long])
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    with torch.no_grad():
        batched = tiny_model(tokens, attention_mask=mask).logits
        assert max_diff(batched[0, :5], tiny_model(short[None]).logits[0]) < TOLERANCE
        assert max_diff(batched[1], tiny_model(long[None]).logits[0]) < TOLERANCE
    assert not batched.isnan().any()


def test_training_forward_has_gradients_for_every_parameter(tiny_model):
    tokens = torch.randint(0, VOCAB, (2, 6))
    loss = torch.nn.functional.cross_entropy(tiny_model(tokens).logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, list(tiny_model.parameters()))
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_embeddings_and_head_are_the_checkpoint_tensors(tiny_model):
    assert tiny_model.embed_tokens is tiny_model.model.embed_tokens
    assert tiny_model.output_head.weight.shape == (VOCAB, 64)
    tokens = torch.tensor([[3, 4]])
    assert torch.equal(tiny_model.embed(tokens), tiny_model.model.embed_tokens.weight[tokens])


# ---------------------------------------------------------------------- cached passes


def prefill(model, cache, slot, tokens):
    slots = torch.tensor([slot])
    out = model.forward_cached(tokens[None], cache, slots)
    cache.advance(slots, [len(tokens)])
    return out.logits[0]


def test_cached_decode_token_by_token_equals_the_training_forward(tiny_model):
    sequence = torch.randint(0, VOCAB, (24,))
    cache = KVCache(tiny_model.config, num_slots=2, max_len=32)
    slot = cache.allocate()
    with torch.no_grad():
        want = tiny_model(sequence[None]).logits[0]
        got = [prefill(tiny_model, cache, slot, sequence[:8])]
        for token in sequence[8:]:
            got.append(prefill(tiny_model, cache, slot, token[None]))
    assert max_diff(torch.cat(got), want) < TOLERANCE
    assert int(cache.lengths[slot]) == 24


def test_rows_at_different_lengths_get_their_own_logits(tiny_model):
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (5, 11, 1)]
    tails = torch.randint(0, VOCAB, (3, 4))
    cache = KVCache(tiny_model.config, num_slots=4, max_len=20)
    cache.allocate()  # slot 0 busy: batch slots are not 0..B-1
    slots = torch.tensor([cache.allocate() for _ in prompts])
    width = max(len(p) for p in prompts)
    padded = torch.stack([torch.cat([p, torch.full((width - len(p),), 7)]) for p in prompts])
    counts = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():  # one right-padded prefill, then batched decode steps
        last = tiny_model.forward_cached(padded, cache, slots, num_tokens=counts, only_last=True).logits[:, 0]
        cache.advance(slots, counts)
        steps = [last]
        for step in range(4):
            steps.append(tiny_model.forward_cached(tails[:, step : step + 1], cache, slots).logits[:, 0])
            cache.advance(slots, [1, 1, 1])
        for row, prompt in enumerate(prompts):
            alone = tiny_model(torch.cat([prompt, tails[row]])[None]).logits[0, len(prompt) - 1 :]
            assert max_diff(torch.stack([s[row] for s in steps]), alone) < TOLERANCE, row
    assert cache.lengths[slots].tolist() == [9, 15, 5]


def path_positions(tree: DraftTree, row: int, position: int) -> list[int]:
    """Verification positions from the root to `position` (root = 0, node i = i + 1)."""
    return [0] + [node + 1 for node in tree.path_to(row, position - 1)] if position else [0]


def two_trees() -> DraftTree:
    """Row 0: a branchy tree; row 1: a chain of 3 and 2 padding nodes."""
    tokens = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]])
    parents = torch.tensor([[-1, -1, 0, 0, 2], [-1, 0, 1, 0, 0]])
    return DraftTree.from_parents(tokens, parents, num_nodes=torch.tensor([5, 3]))


def test_tree_verification_gives_each_node_its_paths_logits(tiny_model):
    prefixes = [torch.randint(0, VOCAB, (n,)) for n in (7, 3)]
    tree, roots = two_trees(), torch.tensor([42, 43])
    inputs = tree.verify_tokens(roots)
    cache = KVCache(tiny_model.config, num_slots=2, max_len=16)
    slots = torch.tensor([cache.allocate(), cache.allocate()])
    with torch.no_grad():
        for slot, prefix in zip(slots.tolist(), prefixes, strict=True):
            prefill(tiny_model, cache, slot, prefix)
        out = tiny_model.forward_cached(inputs, cache, slots, tree_mask=tree.attention_mask(), capture_layers=(1,))
        for row, prefix in enumerate(prefixes):
            for position in range(1 + int(tree.num_nodes[row])):
                path = torch.cat([prefix, inputs[row, path_positions(tree, row, position)]])
                want = tiny_model(path[None], capture_layers=(1,))
                assert max_diff(out.logits[row, position], want.logits[0, -1]) < TOLERANCE, (row, position)
                assert max_diff(out.captured[0][row, position], want.captured[0][0, -1]) < TOLERANCE
    assert cache.lengths[slots].tolist() == [7, 3]  # verification alone commits nothing


def test_commit_keeps_exactly_the_accepted_path(tiny_model):
    prefixes = [torch.randint(0, VOCAB, (n,)) for n in (7, 3)]
    tree, roots = two_trees(), torch.tensor([42, 43])
    inputs = tree.verify_tokens(roots)
    accepted = torch.tensor([[0, 1, 3, 5], [0, 1, -1, -1]])  # row 0: root, node 0, 2, 4; row 1: root, node 0
    cache = KVCache(tiny_model.config, num_slots=2, max_len=16)
    slots = torch.tensor([cache.allocate(), cache.allocate()])
    next_tokens = torch.tensor([[7], [8]])
    with torch.no_grad():
        for slot, prefix in zip(slots.tolist(), prefixes, strict=True):
            prefill(tiny_model, cache, slot, prefix)
        tiny_model.forward_cached(inputs, cache, slots, tree_mask=tree.attention_mask())
        cache.commit(slots, accepted)
        after = tiny_model.forward_cached(next_tokens, cache, slots).logits[:, 0]
        for row, prefix in enumerate(prefixes):
            kept = inputs[row, accepted[row][accepted[row] >= 0]]
            sequence = torch.cat([prefix, kept, next_tokens[row]])
            assert max_diff(after[row], tiny_model(sequence[None]).logits[0, -1]) < TOLERANCE, row
            reference = KVCache(tiny_model.config, num_slots=1, max_len=16)  # the no-tree path's cache
            prefill(tiny_model, reference, reference.allocate(), sequence[:-1])
            length = len(sequence) - 1
            assert max_diff(cache.k[:, slots[row], :, :length], reference.k[:, 0, :, :length]) < TOLERANCE
    assert cache.lengths[slots].tolist() == [11, 5]


def test_a_rejected_draft_never_corrupts_the_committed_prefix(tiny_model):
    cache = KVCache(tiny_model.config, num_slots=1, max_len=12)
    slot = cache.allocate()
    with torch.no_grad():
        prefill(tiny_model, cache, slot, torch.randint(0, VOCAB, (6,)))
        before = cache.k[:, slot, :, :6].clone(), cache.v[:, slot, :, :6].clone()
        tiny_model.forward_cached(torch.randint(0, VOCAB, (1, 6)), cache, torch.tensor([slot]))
        cache.commit(torch.tensor([slot]), [[0]])
    assert torch.equal(cache.k[:, slot, :, :6], before[0]) and torch.equal(cache.v[:, slot, :, :6], before[1])
    assert int(cache.lengths[slot]) == 7


def test_a_prompt_longer_than_the_cache_is_refused_and_the_batch_is_untouched(tiny_model):
    cache = KVCache(tiny_model.config, num_slots=2, max_len=8)
    slots = torch.tensor([cache.allocate(), cache.allocate()])
    with torch.no_grad():
        prefill(tiny_model, cache, 0, torch.randint(0, VOCAB, (3,)))
        before = cache.k.clone()
        prompts = torch.randint(0, VOCAB, (2, 12))
        with pytest.raises(SequenceTooLongError, match=r"slot 0: 3 cached \+ 12 new tokens = 15 positions"):
            tiny_model.forward_cached(prompts, cache, slots, num_tokens=torch.tensor([12, 5]))
    assert torch.equal(cache.k, before) and cache.lengths.tolist() == [3, 0]


@pytest.mark.parametrize("seed", range(4))
def test_random_trees_verify_and_commit_like_their_paths(tiny_model, seed):
    """Random prefixes, tree shapes, padding and accepted paths, three rows at a time."""
    gen = torch.Generator().manual_seed(seed)

    def randint(high: int, low: int = 0) -> int:
        return int(torch.randint(low, high, (), generator=gen))

    n, rows = 6, 3
    prefixes = [torch.randint(0, VOCAB, (randint(9, 1),), generator=gen) for _ in range(rows)]
    parents = torch.tensor([[randint(i + 1) - 1 for i in range(n)] for _ in range(rows)])
    tree = DraftTree.from_parents(torch.randint(0, VOCAB, (rows, n), generator=gen), parents,
                                  num_nodes=torch.tensor([randint(n + 1) for _ in range(rows)]))
    inputs = tree.verify_tokens(torch.randint(0, VOCAB, (rows,), generator=gen))
    ends = [randint(int(tree.num_nodes[r]) + 1) for r in range(rows)]  # accepted path: root .. this position
    kept = [path_positions(tree, r, end) for r, end in enumerate(ends)]
    cache = KVCache(tiny_model.config, num_slots=4, max_len=24)
    slots = torch.tensor([cache.allocate() for _ in range(4)][::-1][:rows])  # slots 3, 2, 1
    with torch.no_grad():
        for slot, prefix in zip(slots.tolist(), prefixes, strict=True):
            prefill(tiny_model, cache, slot, prefix)
        verified = tiny_model.forward_cached(inputs, cache, slots, tree_mask=tree.attention_mask()).logits
        cache.commit(slots, kept)
        nxt = torch.randint(0, VOCAB, (rows, 1), generator=gen)
        after = tiny_model.forward_cached(nxt, cache, slots).logits[:, 0]
        for r, prefix in enumerate(prefixes):
            for position in range(int(tree.num_nodes[r]) + 1):
                path = torch.cat([prefix, inputs[r, path_positions(tree, r, position)]])
                assert max_diff(verified[r, position], tiny_model(path[None]).logits[0, -1]) < TOLERANCE
            accepted = torch.cat([prefix, inputs[r, kept[r]], nxt[r]])
            assert max_diff(after[r], tiny_model(accepted[None]).logits[0, -1]) < TOLERANCE


def test_a_bfloat16_cache_serves_a_float32_model(tiny_model):
    sequence = torch.randint(0, VOCAB, (10,))
    cache = KVCache(tiny_model.config, num_slots=1, max_len=16, dtype=torch.bfloat16)
    with torch.no_grad():
        prefill(tiny_model, cache, cache.allocate(), sequence[:-1])
        got = prefill(tiny_model, cache, 0, sequence[-1:])[-1]
        want = tiny_model(sequence[None]).logits[0, -1]
    assert got.dtype == torch.float32 and max_diff(got, want) < 0.1 * float(want.abs().max())
