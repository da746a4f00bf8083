"""The fast path (respec.engine.fast), run eagerly on the CPU: the same tokens, log-probs
and acceptance as the reference engine, exactly the target's distribution when sampling
(and the test fails when the rule is broken), compaction that changes nothing."""

from __future__ import annotations

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleDrafter, EagleHead
from respec.engine.fast import FastGenerator, buckets_up_to
from respec.engine.fast import chain_step as chain_step_module
from respec.engine.sampling import target_probs
from respec.engine.speculative import Sampling, SpeculativeEngine
from tests.checkpoints import small_qwen2
from tests.engine.stats import chi_square_pvalue, pair_counts
from tests.engine.test_speculative import exact_pair_probs


@pytest.fixture(scope="module")
def model_and_head(tmp_path_factory):
    # A small vocabulary, so that even a random head's drafts are often accepted.
    model = load_model(small_qwen2(tmp_path_factory.mktemp("fast") / "m", vocab=8, layers=3, std=0.5, seed=2))
    torch.manual_seed(0)
    return model, EagleHead.for_target(model, capture_layers=(0, 1, 2))


def prompts_of(batch: int, vocab: int = 8) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return [torch.randint(0, vocab, (2 + 3 * n,), generator=generator).tolist() for n in range(batch)]


def reference(model, head, prompts, k, max_new, eos=()):
    drafter = EagleDrafter(model, head, feature_window=64) if k else None
    engine = SpeculativeEngine(model, drafter, max_rows=len(prompts), max_len=128)
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new, stop_token_ids=eos)
    return engine.generate([torch.tensor(p) for p in prompts], sampling, DraftShape(k, 1, k) if k else None)


def test_buckets_are_powers_of_two_up_to_the_row_count():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(8) == [1, 2, 4, 8]
    assert buckets_up_to(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_greedy_fast_path_equals_the_reference_engine(model_and_head, batch, k):
    model, head = model_and_head
    prompts, eos = prompts_of(batch), (7,)
    expected = reference(model, head, prompts, k, max_new=20, eos=eos)
    fast = FastGenerator(model, head, max_rows=8, max_len=96, max_new=20, max_k=3, eos_ids=eos)
    for ours, theirs in zip(fast.generate(prompts, k, check_every=1), expected, strict=True):
        assert ours.tokens == theirs.tokens
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
        assert ours.steps == theirs.steps  # the same drafts were accepted at every step


def test_long_greedy_rollouts_with_drafting_equal_plain_decoding(model_and_head):
    """Rollouts as long as the GPU bench's (200 tokens past the prompt, no stop): drafting
    changes no token at any position, so on a GPU only bf16 rounding can make them differ."""
    model, head = model_and_head
    prompts = prompts_of(3)
    outputs = {}
    for k in (0, 1, 3):
        fast = FastGenerator(model, head if k else None, max_rows=4, max_len=232, max_new=200, max_k=3)
        outputs[k] = [r.tokens for r in fast.generate(prompts, k)]
    assert all(len(tokens) == 200 for tokens in outputs[0])
    assert outputs[1] == outputs[0] and outputs[3] == outputs[0]


@pytest.mark.parametrize("k", [1, 3])
def test_the_fast_head_drafts_what_the_reference_drafter_drafts(model_and_head, k):
    """Equal acceptance per row is only possible if the drafts agree at every step."""
    model, head = model_and_head
    prompts = prompts_of(5)
    expected = reference(model, head, prompts, k, max_new=24)
    fast = FastGenerator(model, head, max_rows=8, max_len=96, max_new=24, max_k=3)
    results = fast.generate(prompts, k, check_every=1)
    accepted = sum(r.accepted for r in results)
    assert accepted > 0  # the test means something only if drafts get accepted
    for ours, theirs in zip(results, expected, strict=True):
        assert ours.steps == theirs.steps
        assert ours.tokens == theirs.tokens


def test_compacting_the_batch_and_switching_draft_length_change_nothing(model_and_head, monkeypatch):
    """Rows stop at token 6 after 1-10 tokens, so the batch is compacted twice (8 -> 4 -> 1
    rows, live rows moved from behind done ones): the same tokens as without compaction."""
    model, head = model_and_head
    prompts = prompts_of(7)
    fast = FastGenerator(model, head, max_rows=8, max_len=96, max_new=20, max_k=3, eos_ids=(6,))
    plain = fast.generate(prompts, 0, compact=False)
    moved = []
    keep = fast.state.keep
    monkeypatch.setattr(fast.state, "keep", lambda order, live: (moved.append(order[:live].tolist()), keep(order, live)))
    scheduled = fast.generate(prompts, {8: 0, 4: 1, 2: 3, 1: 2}, check_every=1)
    assert [r.tokens for r in scheduled] == [r.tokens for r in plain]
    assert any(rows != list(range(len(rows))) for rows in moved)  # a live row changed place


def test_each_prompt_stops_at_its_own_token_limit(model_and_head):
    """Per-prompt limits (an RL batch whose prompts ask for different lengths): each row is
    the unlimited row cut at its limit, with drafting and compaction on."""
    model, head = model_and_head
    prompts = prompts_of(5)
    fast = FastGenerator(model, head, max_rows=8, max_len=96, max_new=20, max_k=3)
    full = fast.generate(prompts, 2)
    limits = [1, 3, 20, 7, 12]
    limited = fast.generate(prompts, 2, max_new=limits)
    assert [r.tokens for r in limited] == [r.tokens[:limit] for r, limit in zip(full, limits, strict=True)]
    for row, whole, limit in zip(limited, full, limits, strict=True):  # other buckets: float rounding differs
        assert row.logprobs == pytest.approx(whole.logprobs[:limit], abs=1e-5)
    assert limited[0].steps == 0  # its one token came from the prefill: it never stepped
    with pytest.raises(ValueError, match="one limit in"):
        fast.generate(prompts, 2, max_new=[21] * 5)


def test_timing_a_step_leaves_nothing_behind(model_and_head):
    """time_step runs rows that never finish; generation after it is what it was before."""
    model, head = model_and_head
    fast = FastGenerator(model, head, max_rows=4, max_len=96, max_new=12, max_k=3)
    before = [r.tokens for r in fast.generate(prompts_of(3), 2)]
    assert fast.time_step(4, 3, steps=2, repeats=1) > 0 and fast.time_step(1, 0, steps=2, repeats=1) > 0
    assert bool(fast.state.done.all()) and not fast.state.out_count.any()
    assert [r.tokens for r in fast.generate(prompts_of(3), 2)] == before


def test_refreshed_weights_are_the_ones_generating(model_and_head, tmp_path):
    """The fused copies follow the policy after ``refresh_weights`` (an RL update in place)."""
    model = load_model(small_qwen2(tmp_path / "m", vocab=8, layers=3, std=0.5, seed=2))
    head = EagleHead.for_target(model, capture_layers=(0, 1, 2))
    fast = FastGenerator(model, head, max_rows=4, max_len=96, max_new=16, max_k=3)
    prompts = prompts_of(4)
    before = [r.tokens for r in fast.generate(prompts, 2)]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    fast.refresh_weights()
    after = [r.tokens for r in fast.generate(prompts, 2)]
    assert after == [r.tokens for r in reference(model, head, prompts, 2, max_new=16)]
    assert after != before


def test_bad_input_is_refused(model_and_head):
    model, head = model_and_head
    with pytest.raises(ValueError, match="needs a draft head"):
        FastGenerator(model, None, max_rows=2, max_len=64, max_new=8).generate([[1, 2]], 2)
    fast = FastGenerator(model, head, max_rows=2, max_len=32, max_new=8, max_k=3)
    with pytest.raises(ValueError, match="does not fit max_len"):
        fast.generate([[1] * 30], 1)
    with pytest.raises(ValueError, match="1..2 prompts"):
        fast.generate([[1]] * 3, 1)
    with pytest.raises(ValueError, match="at least one token"):
        fast.generate([[]], 1)


def sampled_pairs(model, head, prompt, rows=24_000, chunk=4_000):
    """Rows of 3 tokens at temperature 1 with chains of 2 drafts; (context, x2, x3) for the
    rows whose first token is the most frequent (as tests/engine/test_speculative.py does)."""
    torch.manual_seed(0)
    fast = FastGenerator(model, head, max_rows=chunk, max_len=24, max_new=3, max_k=2, temperature=1.0)
    triples = torch.cat([torch.tensor([r.tokens for r in fast.generate([prompt] * chunk, 2, compact=False)])
                         for _ in range(rows // chunk)])
    first = int(torch.bincount(triples[:, 0]).argmax())
    kept = triples[triples[:, 0] == first]
    return torch.cat([torch.tensor(prompt), torch.tensor([first])]), kept[:, 1], kept[:, 2]


def plain_probs(logits):
    ones = torch.ones(logits.shape[0])
    return target_probs(logits, ones, torch.zeros_like(ones).long(), ones)


@pytest.fixture(scope="module")
def six_token_model_and_head(tmp_path_factory):
    """test_speculative.py's distribution-test model: every (x2, x3) cell is likely enough."""
    model = load_model(small_qwen2(tmp_path_factory.mktemp("fast6") / "m", vocab=6, std=0.5, seed=1))
    torch.manual_seed(0)
    return model, EagleHead.for_target(model, capture_layers=(0, 1, 1))


def test_sampled_fast_sd_has_exactly_the_target_distribution(six_token_model_and_head):
    model, head = six_token_model_and_head
    context, second, third = sampled_pairs(model, head, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
    _, pvalue = chi_square_pvalue(pair_counts(second, third, 6), exact_pair_probs(model, context, plain_probs))
    assert pvalue > 1e-3


def test_the_statistical_test_fails_when_the_fast_rule_is_broken(six_token_model_and_head, monkeypatch):
    model, head = six_token_model_and_head
    original = chain_step_module._accept

    def keep_every_draft(logits, drafts, temperature):
        _, bonus = original(logits, drafts, temperature)
        return torch.full_like(bonus, drafts.shape[1]), bonus

    monkeypatch.setattr(chain_step_module, "_accept", keep_every_draft)
    context, second, third = sampled_pairs(model, head, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1], rows=16_000)
    _, pvalue = chi_square_pvalue(pair_counts(second, third, 6), exact_pair_probs(model, context, plain_probs))
    assert pvalue < 1e-6


def test_chains_count_every_row_step_by_its_draft_length(model_and_head):
    """generate's `chains` (what a live scheduler reads acceptance from): per draft length,
    the row-steps that drafted it; over a run they add up to the rows' verification steps."""
    model, head = model_and_head
    generator = FastGenerator(model, head, max_rows=8, max_len=96, max_new=20, max_k=3, eos_ids=(1,))
    results = generator.generate(prompts_of(7), {8: 3, 4: 2, 2: 1, 1: 0})
    assert sum(generator.chains.values()) == sum(r.steps for r in results)
    assert set(generator.chains) <= {0, 1, 2, 3} and generator.chains.get(3, 0) > 0
    # the steps the call ran: the longest-lived row's (a batch's time is about these)
    assert generator.steps_taken == max(r.steps for r in results) > min(r.steps for r in results)
