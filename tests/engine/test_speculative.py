"""The rollout engine: greedy SD equals greedy decoding token for token, sampled SD has
exactly the target's distribution (and the test fails when the rule is broken), bad input
is refused without losing the rows already running."""

from __future__ import annotations

import pytest
import torch

from respec.engine import acceptance
from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.ngram import NgramDrafter
from respec.engine.errors import CacheFullError
from respec.engine.speculative import Sampling, SpeculativeEngine
from tests.checkpoints import small_qwen2
from tests.engine.stats import chi_square_pvalue, pair_counts


def tiny_model(tmp_path, vocab=40, std=0.2, seed=0):
    return load_model(small_qwen2(tmp_path / f"m{vocab}", vocab=vocab, std=std, seed=seed))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


SHAPES = [DraftShape(4, 1, 4), DraftShape(2, 1, 1), DraftShape(3, 2, 6), DraftShape(3, 3, 8)]


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_greedy_sd_equals_greedy_decoding(model, batch, shape):
    generator = torch.Generator().manual_seed(batch)
    # repetitive prompts of different lengths, so the n-gram drafter has something to say
    prompts = [torch.randint(0, 40, (3,), generator=generator).repeat(n)[: 2 + 3 * n] for n in range(1, batch + 1)]
    sampling = Sampling(temperature=0.0, max_new_tokens=24)
    plain = SpeculativeEngine(model, None, max_rows=max(1, batch // 2), max_len=128).generate(prompts, sampling)
    engine = SpeculativeEngine(model, NgramDrafter(), max_rows=max(1, batch // 2), max_len=128)
    speculative = engine.generate(prompts, sampling, shape)
    for a, b in zip(plain, speculative, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    tokens = sum(len(r.tokens) for r in speculative)
    steps = sum(r.steps for r in speculative)
    assert tokens > steps  # drafts were accepted: this is not plain decoding in disguise


def test_a_steps_token_count_is_what_the_rows_kept(model):
    """Budgets of 3-6 tokens end rows inside a step whose drafts were accepted past the end:
    the step reports what the rows kept (what the Scheduler's acceptance must learn from)."""
    prompts = [torch.tensor([5, 1, 5, 1, 5, 1, 5]), torch.arange(9) % 4, torch.tensor([2, 3, 2, 3, 2])]
    engine = SpeculativeEngine(model, NgramDrafter(min_n=1), max_rows=3, max_len=64)
    ids = engine.add(prompts, Sampling(temperature=0.0, max_new_tokens=6))
    for row_id, budget in zip(ids, (3, 4, 6), strict=True):
        engine.rows[row_id].sampling = Sampling(temperature=0.0, max_new_tokens=budget)
    rows = {row.row_id: row for row in engine.rows.values()}
    reported, verified = 0, 0
    original = engine.target.verify

    def counting(*args, **kwargs):
        nonlocal verified
        out = original(*args, **kwargs)
        verified += int(out.num_tokens.sum())
        return out

    engine.target.verify = counting
    while engine.rows:
        reported += engine.step(DraftShape(4, 1, 4)).tokens
    assert [len(rows[i].tokens) for i in ids] == [3, 4, 6]
    assert reported == 3 + 4 + 6 - 3  # every token past each row's prefill token
    assert verified > reported  # drafts were accepted past a budget: the case that matters


def test_generate_returns_rows_in_prompt_order_when_equal_lengths_are_not_adjacent(model):
    # prefill groups equal-length prompts; the rows must still come back in prompt order
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 3, 5, 4, 3, 6, 4, 5]
    prompts = [torch.randint(0, 40, (n,), generator=generator) for n in lengths]
    sampling = Sampling(temperature=0.0, max_new_tokens=8)
    batched = SpeculativeEngine(model, None, max_rows=8, max_len=64).generate(prompts, sampling)
    for prompt, row in zip(prompts, batched, strict=True):
        alone = SpeculativeEngine(model, None, max_rows=1, max_len=64).generate([prompt], sampling)[0]
        assert torch.equal(row.prompt, prompt) and row.tokens == alone.tokens


def test_greedy_equality_also_holds_when_drafts_are_rejected(model):
    prompts = [torch.arange(10) % 7, torch.tensor([5, 1, 5, 1, 5, 2, 5])]
    sampling = Sampling(temperature=0.0, max_new_tokens=40)
    plain = SpeculativeEngine(model, None, max_rows=2, max_len=128).generate(prompts, sampling)
    engine = SpeculativeEngine(model, NgramDrafter(min_n=1), max_rows=2, max_len=128)
    rejected = 0
    original = acceptance.accept

    def counting(tree, *args, **kwargs):
        nonlocal rejected
        result = original(tree, *args, **kwargs)
        rejected += int(((tree.valid_mask().sum(1) > 0) & (result.num_accepted < tree.depths().max(1).values)).sum())
        return result

    import respec.engine.target as target_module

    target_module.accept = counting
    try:
        speculative = engine.generate(prompts, sampling, DraftShape(4, 2, 6))
    finally:
        target_module.accept = original
    assert [r.tokens for r in plain] == [r.tokens for r in speculative]
    assert rejected > 0


def exact_pair_probs(model, prompt, sampling_probs) -> torch.Tensor:
    """P(x1, x2) of plain sampling: the target's processed distributions, computed directly."""
    with torch.no_grad():
        first = sampling_probs(model(prompt[None]).logits[:, -1:])[0, 0]
        vocab = first.numel()
        follow = torch.stack([torch.cat([prompt, torch.tensor([x])]) for x in range(vocab)])
        second = sampling_probs(model(follow).logits[:, -1:])[:, 0]
    return first[:, None] * second


def sd_pairs(model, prompt, sampling, shape, rows=24_000, chunk=3_000, seed=0):
    """Generate 3 tokens per row; the first comes from prefill, tokens 2 and 3 from one SD
    step (accepted drafts and/or the bonus). Returns x1 and the pairs (x2, x3) of the rows
    whose x1 is the most frequent, with the prompt those pairs follow."""
    engine = SpeculativeEngine(model, NgramDrafter(), max_rows=chunk, max_len=32, seed=seed)
    triples = torch.cat([torch.tensor([r.tokens[:3] for r in engine.generate([prompt] * chunk, sampling, shape)])
                         for _ in range(rows // chunk)])
    first = int(torch.bincount(triples[:, 0]).argmax())
    kept = triples[triples[:, 0] == first]
    return torch.cat([prompt, torch.tensor([first])]), kept[:, 1], kept[:, 2]


@pytest.mark.parametrize("top_k, temperature", [(0, 1.0), (3, 0.8)])
def test_sampled_sd_has_exactly_the_target_distribution(tmp_path, top_k, temperature):
    model = tiny_model(tmp_path, vocab=6, std=0.5, seed=1)
    prompt = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1])  # the n-gram drafter finds patterns
    sampling = Sampling(temperature=temperature, top_k=top_k, max_new_tokens=3)
    from respec.engine.sampling import target_probs

    def processed(logits):
        ones = torch.ones(logits.shape[0])
        return target_probs(logits, ones * temperature, (ones * top_k).long(), ones)

    context, second, third = sd_pairs(model, prompt, sampling, DraftShape(2, 2, 3))
    expected = exact_pair_probs(model, context, processed)
    _, pvalue = chi_square_pvalue(pair_counts(second, third, 6), expected)
    assert pvalue > 1e-3


def test_the_statistical_test_fails_when_the_acceptance_rule_is_broken(tmp_path, monkeypatch):
    model = tiny_model(tmp_path, vocab=6, std=0.5, seed=1)
    prompt = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
    always = acceptance.Rule(accept=lambda r, q, token, gen: torch.ones_like(token, dtype=torch.bool),
                             after_reject=acceptance.DETERMINISTIC.after_reject, bonus=acceptance.DETERMINISTIC.bonus)
    monkeypatch.setattr(acceptance, "DETERMINISTIC", always)
    from respec.engine.sampling import target_probs

    def processed(logits):
        ones = torch.ones(logits.shape[0])
        return target_probs(logits, ones, torch.zeros_like(ones).long(), ones)

    context, second, third = sd_pairs(model, prompt, Sampling(temperature=1.0, max_new_tokens=3), DraftShape(2, 1, 2))
    expected = exact_pair_probs(model, context, processed)
    _, pvalue = chi_square_pvalue(pair_counts(second, third, 6), expected)
    assert pvalue < 1e-6


@pytest.mark.parametrize("shape", [None, DraftShape(3, 2, 6)], ids=["nosd", "s3_t2_n6"])
def test_a_sampled_row_depends_on_its_stream_alone(model, shape):
    """Rows sample from their own keyed streams: a row's tokens do not change when its
    batch mates do (other prompts, other lengths of output), nor with what the engine ran
    before; the default keys follow the order rows are opened in."""
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 40, (6,), generator=generator) for _ in range(4)]
    sampling = Sampling(temperature=1.0, max_new_tokens=20)

    def run(batch, warm_up=False):
        engine = SpeculativeEngine(model, NgramDrafter(), max_rows=8, max_len=64, seed=3)
        if warm_up:  # another batch first: then these rows are opened later (other keys)
            engine.generate(prompts[:2], sampling, shape)
            engine.target.rows_opened = 0
        return [row.tokens for row in engine.generate(batch, sampling, shape)]

    first = run(prompts)
    mates_changed = run([prompts[0], prompts[3], prompts[2]])  # row 1: another prompt; no row 3
    assert mates_changed[0] == first[0] and mates_changed[2] == first[2]
    assert mates_changed[1] != first[1]
    assert run(prompts, warm_up=True) == first


def test_sampled_tokens_do_not_depend_on_what_was_drafted(tmp_path):
    """Deterministic drafts (n-gram here) are checked against the token plain sampling draws
    from the position's own uniform: with row streams, SD on or off and any draft shape emit
    the same tokens; only the number of target passes differs."""
    model = tiny_model(tmp_path, vocab=6, std=0.5, seed=1)  # peaked: drafts are often right
    prompts = [torch.tensor([1, 2, 3] * 3 + [1]), torch.tensor([4, 5] * 5), torch.tensor([3, 1, 4, 1, 5] * 2)]
    sampling = Sampling(temperature=1.0, max_new_tokens=24)
    outputs, passes = [], []
    for shape in (None, DraftShape(4, 1, 4), DraftShape(3, 2, 6)):
        rows = SpeculativeEngine(model, NgramDrafter(), max_rows=4, max_len=64, seed=9).generate(prompts, sampling, shape)
        outputs.append([row.tokens for row in rows])
        passes.append(sum(row.steps for row in rows))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert passes[1] < passes[0] and passes[2] < passes[0]  # drafts were accepted


def test_bad_input_is_refused_and_running_rows_continue(model):
    engine = SpeculativeEngine(model, NgramDrafter(), max_rows=4, max_len=32)
    running = engine.add([torch.tensor([1, 2, 3])], Sampling(temperature=0, max_new_tokens=10))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        engine.add([torch.tensor([1])], Sampling(temperature=-1))
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.add([torch.tensor([1])], Sampling(top_p=0.0))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        engine.add([torch.tensor([1])], Sampling(top_k=-2))
    with pytest.raises(CacheFullError, match="a prompt of 40 tokens"):
        engine.add([torch.zeros(40, dtype=torch.long)], Sampling(max_new_tokens=4))
    while engine.rows:
        engine.step(DraftShape(2, 1, 2))
    assert [r.row_id for r in engine.finished] == running and len(engine.finished[0].tokens) == 10
