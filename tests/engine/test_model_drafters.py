"""Model drafters (an EAGLE-3-style head, a small draft model): greedy SD through the engine
equals plain greedy decoding token for token, whatever the drafts; a trained head and a
draft model equal to the target are actually accepted; the target's features reach the
drafter aligned with the history; distillation loss, weights, save/load."""

from __future__ import annotations

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftRequest, DraftShape
from respec.engine.drafters.draft_model import DraftModelDrafter
from respec.engine.drafters.eagle import (
    EagleDrafter,
    EagleHead,
    _DraftKV,
    distill_loss,
    layers_to_capture,
)
from respec.engine.sampling import target_probs
from respec.engine.speculative import Sampling, SpeculativeEngine
from tests.checkpoints import random_checkpoint, small_qwen2
from tests.engine.stats import chi_square_pvalue, pair_counts
from tests.engine.test_speculative import exact_pair_probs
from tests.engine.test_speculative import tiny_model as tiny_speculative_model
from tests.heads import greedy_distilled_head

VOCAB = 40
SHAPES = [DraftShape(4, 1, 4), DraftShape(3, 2, 6), DraftShape(3, 3, 8)]
GREEDY = Sampling(temperature=0.0, max_new_tokens=20)


def tiny_model(directory, layers=4, hidden=32, heads=4, kv_heads=2, seed=0, std=0.2):
    return load_model(small_qwen2(directory, VOCAB, hidden, layers, heads, kv_heads, seed, std))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("small"), layers=1, hidden=16, heads=2, kv_heads=1, seed=5, std=0.3)


def prompts_for(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Random prompts of different lengths (3, 4, ...)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (3 + n,), generator=generator) for n in range(batch)]


_plain_cache: dict[tuple[int, int], list] = {}


def plain_greedy(target, batch: int) -> list:
    key = (id(target), batch)
    if key not in _plain_cache:
        engine = SpeculativeEngine(target, None, max_rows=4, max_len=96)
        _plain_cache[key] = engine.generate(prompts_for(batch), GREEDY)
    return _plain_cache[key]


def speculative_greedy(target, drafter, batch: int, shape: DraftShape) -> tuple[list, float]:
    """The rows, and emitted tokens per verification step (the prefill token not counted)."""
    engine = SpeculativeEngine(target, drafter, max_rows=4, max_len=96)
    rows = engine.generate(prompts_for(batch), GREEDY, shape)
    return rows, sum(len(r.tokens) - 1 for r in rows) / sum(r.steps for r in rows)


def assert_same_as_plain(target, rows, batch):
    plain = plain_greedy(target, batch)
    for a, b in zip(plain, rows, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def trained_head(target):
    """A head distilled for 200 steps on the target's greedy continuations of other prompts."""
    generator = torch.Generator().manual_seed(99)
    train_prompts = [torch.randint(0, VOCAB, (4,), generator=generator) for _ in range(48)]
    return greedy_distilled_head(target, train_prompts, max_new_tokens=32, steps=200)


# ---------------------------------------------------------------------- EAGLE


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_random_eagle_head_keeps_greedy_exact(target, batch, shape):
    torch.manual_seed(1)
    rows, _ = speculative_greedy(target, EagleDrafter(target), batch, shape)
    assert_same_as_plain(target, rows, batch)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_trained_eagle_head_is_accepted_and_exact(target, trained_head, batch, shape):
    rows, tokens_per_step = speculative_greedy(target, EagleDrafter(target, trained_head), batch, shape)
    assert_same_as_plain(target, rows, batch)
    assert tokens_per_step > 1.3


def test_target_features_reach_the_drafter_aligned_with_history(target, trained_head):
    """After prefill and tree steps, each row keeps the target's features of history[:-1]'s
    tail, exactly what a full forward over the history computes there."""
    drafter = EagleDrafter(target, trained_head, feature_window=5)
    engine = SpeculativeEngine(target, drafter, max_rows=4, max_len=96)
    engine.add(prompts_for(3), Sampling(temperature=0.0, max_new_tokens=50), reserve=6)
    for _ in range(4):
        engine.step(DraftShape(3, 2, 6))
    for row in engine.rows.values():
        history = row.history()
        with torch.no_grad():
            captured = target(history[None], capture_layers=drafter.capture_layers).captured
        expected = torch.cat(captured, dim=-1)[0, :-1][-5:]
        assert row.features.shape == expected.shape
        torch.testing.assert_close(row.features, expected, atol=1e-4, rtol=1e-4)


def test_cached_drafts_equal_drafts_recomputed_from_the_whole_history(target, trained_head):
    """The head's keys/values kept across steps give the same trees as a fresh drafter that
    runs the head over every committed position of the row at once."""
    drafter = EagleDrafter(target, trained_head, feature_window=5)
    engine = SpeculativeEngine(target, drafter, max_rows=4, max_len=96)
    engine.add(prompts_for(3), Sampling(temperature=0.0, max_new_tokens=50), reserve=6)
    for shape in (DraftShape(3, 2, 6), DraftShape(4, 1, 4), DraftShape(3, 2, 6)):
        engine.step(shape)
        rows = list(engine.rows.values())
        histories = [row.history() for row in rows]
        width = max(len(h) for h in histories) - 1
        features = torch.zeros(len(rows), width, 3 * target.config.hidden_size)
        with torch.no_grad():
            for b, history in enumerate(histories):
                captured = target(history[None], capture_layers=drafter.capture_layers).captured
                features[b, width - len(history) + 1:] = torch.cat(captured, dim=-1)[0, :-1]
        request = DraftRequest(histories, features, [row.row_id for row in rows], shape)
        fresh = EagleDrafter(target, trained_head, feature_window=width)
        got, want = drafter.propose(request).tree, fresh.propose(request).tree
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)


def test_eagle_drafter_refuses_a_request_without_features(target):
    request = DraftRequest([torch.tensor([1, 2, 3])], None, [0], DraftShape(2, 1, 2))
    with pytest.raises(ValueError, match="needs target features"):
        EagleDrafter(target).propose(request)


def test_layers_to_capture_are_low_mid_high_and_clamped():
    def config(layers):
        return type("Config", (), {"num_hidden_layers": layers})()

    assert layers_to_capture(config(28)) == (1, 14, 26)
    assert layers_to_capture(config(4)) == (1, 2, 2)
    assert layers_to_capture(config(2)) == (1, 1, 1)
    assert layers_to_capture(config(1)) == (0, 0, 0)


def test_distill_loss_decreases_and_weights_change_it(target):
    sequences = torch.stack(prompts_for(4, seed=3)[:1] * 2 + [torch.arange(3) % 5, torch.arange(3) + 7])
    torch.manual_seed(0)
    head = EagleHead.for_target(target)
    with torch.no_grad():
        output = target(sequences, capture_layers=head.capture_layers)
    features = torch.cat(output.captured, dim=-1)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    uniform = distill_loss(head, features, sequences, output.logits).detach()
    weighted = distill_loss(head, features, sequences, output.logits, weights).detach()
    assert float(weighted) != pytest.approx(float(uniform), rel=1e-3)
    doubled = distill_loss(head, features, sequences, output.logits, 2 * weights).detach()
    assert float(doubled) == pytest.approx(2 * float(weighted), rel=1e-5)

    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = distill_loss(head, features, sequences, output.logits, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in target.parameters())  # the target's shared parts stay frozen


def test_unrolled_steps_are_what_a_chain_draft_computes(target):
    """Step s of the unrolled training pass at position p equals the head's output at the
    (s - 1)-th drafted node of a chain rooted at p - s + 1 whose drafts are the true tokens."""
    torch.manual_seed(2)
    head = EagleHead.for_target(target)
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        features = torch.cat(target(tokens, capture_layers=head.capture_layers).captured, dim=-1)
        unrolled = head.unrolled(features, tokens, 3)
        for steps in (1, 2, 3):
            for root in range(0, 9):
                kv = _DraftKV()
                count = root + 1
                causal = torch.ones(count, count, dtype=torch.bool).tril()[None, None]
                hidden = head(head.fuse(features[:, :count]), tokens[:, 1 : count + 1], torch.arange(count)[None],
                              causal, kv)[:, -1:]
                for node in range(1, steps):
                    position = root + node
                    hidden = head(hidden, tokens[:, position + 1 : position + 2], torch.tensor([[position]]),
                                  torch.ones(1, 1, 1, count + node, dtype=torch.bool), kv)
                torch.testing.assert_close(head.logits(hidden)[:, 0], unrolled[steps - 1][:, root + steps - 1],
                                           atol=1e-5, rtol=1e-5)


def test_multi_step_distill_loss_trains_every_step(target, trained_head):
    """A head trained on step 1 only is worse at step 2 than at step 1; steps=2 is a
    different loss and it goes down."""
    sequences = torch.stack(prompts_for(4, seed=5)[:1] * 4)
    with torch.no_grad():
        output = target(sequences, capture_layers=trained_head.capture_layers)
    features = torch.cat(output.captured, dim=-1)
    one = distill_loss(trained_head, features, sequences, output.logits).item()
    two = distill_loss(trained_head, features, sequences, output.logits, steps=2).item()
    assert two != pytest.approx(one, rel=1e-3)
    torch.manual_seed(0)
    head = EagleHead.for_target(target)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = distill_loss(head, features, sequences, output.logits, steps=3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_head_save_load_round_trip(target, trained_head, tmp_path):
    trained_head.save(tmp_path / "head")
    loaded = EagleHead.load(tmp_path / "head", target)
    assert loaded.capture_layers == trained_head.capture_layers
    for name, tensor in trained_head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert not any(name.startswith(("target", "embed", "lm_head")) for name in loaded.state_dict())
    rows_a, _ = speculative_greedy(target, EagleDrafter(target, trained_head), 2, DraftShape(3, 2, 6))
    rows_b, _ = speculative_greedy(target, EagleDrafter(target, loaded), 2, DraftShape(3, 2, 6))
    assert [r.steps for r in rows_a] == [r.steps for r in rows_b]


def test_head_load_refuses_a_target_of_another_size(target, trained_head, small, tmp_path):
    trained_head.save(tmp_path / "head")
    with pytest.raises(ValueError, match="hidden_size"):
        EagleHead.load(tmp_path / "head", small)


# ---------------------------------------------------------------------- draft model


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_draft_model_equal_to_target_is_accepted_and_exact(target, batch, shape):
    rows, tokens_per_step = speculative_greedy(target, DraftModelDrafter(target, 4, 96), batch, shape)
    assert_same_as_plain(target, rows, batch)
    assert tokens_per_step > 2.0


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_unrelated_draft_model_is_rejected_and_exact(target, small, batch, shape):
    rows, tokens_per_step = speculative_greedy(target, DraftModelDrafter(small, 4, 96), batch, shape)
    assert_same_as_plain(target, rows, batch)
    assert tokens_per_step < 1.3


def test_draft_model_slots_are_released_with_their_rows(target):
    drafter = DraftModelDrafter(target, 4, 96)
    speculative_greedy(target, drafter, 8, DraftShape(3, 1, 3))
    assert drafter.cache.num_free == 4 and not drafter.slot_of


def test_draft_model_chain_matches_its_own_greedy_continuation(target):
    """A t = 1 proposal is the draft model's greedy continuation of the history."""
    history = torch.tensor([3, 1, 4, 1, 5])
    drafter = DraftModelDrafter(target, 1, 32)
    for _ in range(2):  # the second proposal starts from the cache the first one left
        proposal = drafter.propose(DraftRequest([history], None, [0], DraftShape(4, 1, 4)))
        expected, context = [], history
        with torch.no_grad():
            for _ in range(4):
                expected.append(int(target(context[None]).logits[0, -1].argmax()))
                context = torch.cat([context, torch.tensor(expected[-1:])])
        assert proposal.tree.tokens[0].tolist() == expected
        assert proposal.tree.parents[0].tolist() == [-1, 0, 1, 2] and proposal.draft_probs is None
        history = torch.cat([history, torch.tensor(expected[:2])])


# ---------------------------------------------------------------------- sampled SD


def sampled_pairs(model, drafter, prompt, sampling, shape, rows=24_000, chunk=3_000):
    """(context, x2, x3) over the rows whose first token x1 is the most frequent, and the
    share of rows that got x2 and x3 from one step (a draft was accepted)."""
    engine = SpeculativeEngine(model, drafter, max_rows=chunk, max_len=32, seed=7)
    finished = [r for _ in range(rows // chunk) for r in engine.generate([prompt] * chunk, sampling, shape)]
    triples = torch.tensor([r.tokens[:3] for r in finished])
    first = int(torch.bincount(triples[:, 0]).argmax())
    kept = triples[triples[:, 0] == first]
    one_step = sum(r.steps == 1 for r in finished) / len(finished)
    return torch.cat([prompt, torch.tensor([first])]), kept[:, 1], kept[:, 2], one_step


@pytest.mark.parametrize("which", ["eagle", "draft_model"])
def test_sampled_sd_with_model_drafts_has_the_target_distribution(tmp_path, which):
    """Top-t drafts of a model are deterministic given the context, so the deterministic
    rule keeps sampling exact: (x2, x3) pairs match the target's own P(x2, x3 | x1)."""
    model = tiny_speculative_model(tmp_path, vocab=6, std=0.5, seed=1)
    drafter = EagleDrafter(model) if which == "eagle" else DraftModelDrafter(model, 3_000, 32)
    context, second, third, one_step = sampled_pairs(model, drafter, torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1]),
                                           Sampling(temperature=1.0, max_new_tokens=3), DraftShape(2, 2, 3))

    def processed(logits):
        ones = torch.ones(logits.shape[0])
        return target_probs(logits, ones, torch.zeros_like(ones).long(), ones)

    _, pvalue = chi_square_pvalue(pair_counts(second, third, 6), exact_pair_probs(model, context, processed))
    assert pvalue > 1e-3
    assert one_step > 0.1  # drafts were accepted: not plain sampling in disguise


def test_a_heads_target_parts_are_copied_once_under_each_name(tmp_path):
    """TargetParts.state_of: the embedding, final norm and lm_head under their state_dict
    names, copies (the trainer updates its own in place); tied embeddings copied once."""
    from respec.engine.drafters.eagle import TargetParts

    for tied in (False, True):
        _, directory = random_checkpoint(tmp_path / str(tied), vocab_size=40, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=tied)
        target = load_model(directory)
        state = TargetParts.state_of(target)
        assert sorted(state) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
        assert torch.equal(state["lm_head.weight"], target.lm_head.weight)
        assert state["lm_head.weight"].data_ptr() != target.lm_head.weight.data_ptr()
        assert (state["lm_head.weight"] is state["model.embed_tokens.weight"]) == tied
