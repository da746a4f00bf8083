"""The fast path's live draft-length choice (respec.sched.draft_lengths, used by
bench/gpu_rl.py and FastRollouts): the acceptance rate it reads from a generation's chains,
and the draft lengths it picks from it (no GPU needed: plain arithmetic on profiles)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from respec.sched.draft_lengths import LiveChoice, accepted_per_chain, chain_acceptance  # noqa: E402


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.75, 0.95])
def test_chain_acceptance_recovers_the_rate_that_produced_the_counts(rate):
    chains = {0: 50, 2: 100, 5: 300}
    accepted = sum(n * accepted_per_chain(rate, [k])[k] for k, n in chains.items())
    assert chain_acceptance(chains, accepted) == pytest.approx(rate, abs=1e-6)


def test_plain_decoding_only_says_nothing_about_acceptance():
    assert chain_acceptance({0: 100}, 0) == 0.0


def profile(rows: int = 8) -> dict:
    # A verification of k + 1 tokens costs (1 + 0.1 k) of a plain step at 1 row, (1 + 0.5 k) at `rows`.
    step_s = {f"{b}/{k}": 1.0 + (0.1 if b == 1 else 0.5) * k for b in (1, rows) for k in range(7)}
    return {"step_s": step_s, "accepted_per_step": {k: accepted_per_chain(0.8, [k])[k] for k in range(1, 7)}}


def test_live_choice_drafts_less_when_the_head_goes_stale():
    live = LiveChoice.from_profile(profile(), 8)
    assert live.rate == pytest.approx(0.8, abs=1e-6)
    eager = dict(live.choice)
    assert eager[1] >= 4 and eager[8] >= 1
    for _ in range(6):  # rollouts where the head's drafts are rarely accepted
        live.observe({eager[8]: 400, eager[1]: 40}, accepted=int(0.1 * 440))
    assert live.rate < 0.2
    assert live.choice[8] == 0 and live.choice[1] < eager[1]


def test_live_choice_refuses_a_profile_without_the_runs_batch():
    with pytest.raises(ValueError, match="16 rows"):
        LiveChoice.from_profile(profile(8), 16)


def test_variant_names_say_what_runs_where():
    from gpu_rl import Variant

    baseline, respec_two, half = Variant("sync_nosd_2gpu"), Variant("respec_2gpu"), Variant("sync_nosd_half")
    assert (baseline.drafting, baseline.overlapped, baseline.two_gpus) == (False, False, True)
    assert (respec_two.drafting, respec_two.overlapped, respec_two.two_gpus) == (True, True, True)
    assert half.half and not half.two_gpus and not half.overlapped
    assert Variant("respec").switch_interval < Variant("respec_switch_5ms").switch_interval
    assert Variant("respec_2gpu_whole").whole_distill and not respec_two.whole_distill


def test_unknown_variant_is_refused_before_anything_runs():
    from gpu_rl import rl_section

    with pytest.raises(ValueError, match="unknown RL variants"):
        rl_section(None, None, None, profile(), 1, 1, 8, 8, 1e-5, print, ("sync_nosd", "respec_3gpu"))


def test_flattened_parameters_keep_the_model_and_publish_in_one_copy():
    import torch
    from gpu_rl import flatten_parameters

    from respec.engine.config import ModelConfig
    from respec.engine.model import CausalLM

    torch.manual_seed(0)
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=32, hidden_size=16, head_dim=4, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)
    source, target = CausalLM(config).eval(), CausalLM(config).eval()
    tokens = torch.randint(0, 32, (2, 5))
    before = source(tokens).logits
    flat_source, flat_target = flatten_parameters(source), flatten_parameters(target)
    assert torch.equal(source(tokens).logits, before)
    assert all(p.untyped_storage().data_ptr() == flat_source.untyped_storage().data_ptr() for p in source.parameters())
    assert flat_source.numel() == sum(p.numel() for p in source.parameters())
    flat_target.copy_(flat_source)
    assert torch.equal(target(tokens).logits, before)


def test_head_update_in_slices_is_the_update_in_one_piece():
    """Three calls that accumulate a third of the loss each, the last one applying it, move
    the head exactly as one call over the same rollouts (fails if a slice clears the
    gradients of the one before, or applies early)."""
    import copy

    import torch
    from gpu_distill import distill_rollouts

    from respec.engine.drafters.eagle import EagleHead
    from respec.rl.trainer import TrainSample

    target = tiny_char_policy()
    vocab = target.config.vocab_size
    samples = [TrainSample(torch.randint(3, vocab, (4,)), torch.randint(3, vocab, (6,)), torch.zeros(6), r, "g")
               for r in (1.0, 0.0, 1.0, 0.5)]
    rewards = [s.reward for s in samples]

    def trained(calls):
        head = EagleHead.for_target(target).train()
        head.load_state_dict(base.state_dict())
        optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
        for scale, apply in calls:
            distill_rollouts(target, head, optimizer, samples, rewards, scale=scale, apply=apply)
        return head

    base = copy.deepcopy(EagleHead.for_target(target))
    whole = trained([(1.0, True)])
    sliced = trained([(1 / 3, False), (1 / 3, False), (1 / 3, True)])
    early = trained([(1 / 3, True), (1 / 3, True), (1 / 3, True)])
    for a, b in zip(whole.parameters(), sliced.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(whole.parameters(), early.parameters(), strict=True))


def test_head_distilled_from_the_updates_pass_equals_one_from_a_target_pass_before_it():
    """The RL section's head learns from the GRPO update's own view of the rollouts
    (captured_views): the same head update as a target pass of the weights before the
    update over the same rollouts (target_views), and not the same as one after it. Only
    the latest rollouts are taken (fails if `first` is ignored). The update's micro-batches
    of two make three views, whose means count by their share of the rollouts (fails if
    each view's mean counts alike)."""
    import copy

    import torch
    from gpu_distill import captured_views, distill_views, target_views

    from respec.engine.drafters.eagle import EagleHead
    from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample

    policy = tiny_char_policy()
    vocab = policy.config.vocab_size
    before = copy.deepcopy(policy)
    base = EagleHead.for_target(before)
    samples = [TrainSample(torch.randint(3, vocab, (4,)), torch.randint(3, vocab, (n,)), torch.full((n,), -3.0), r,
                           str(i // 3)) for i, (n, r) in enumerate(zip((6, 3, 5, 7, 2, 4), (1.0, 0.0, 1.0, 0.5, 0.0, 1.0),
                                                                        strict=True))]
    trainer = GRPOTrainer(policy, TrainerConfig(lr=1e-1, micro_batch=2, capture_layers=base.capture_layers))
    trainer.step(samples)

    def trained(views):
        head = EagleHead.for_target(before).train()
        head.load_state_dict(base.state_dict())
        distill_views(head, torch.optim.SGD(head.parameters(), lr=0.5), views)
        return head

    from_update = trained(captured_views(trainer.captured, samples, 2))
    from_before = trained(target_views(before, base, samples[2:]))
    from_after = trained(target_views(policy, base, samples[2:]))
    from_all = trained(target_views(before, base, samples))
    for a, b in zip(from_update.parameters(), from_before.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for other in (from_after, from_all):
        assert any(not torch.allclose(a, b) for a, b in zip(from_update.parameters(), other.parameters(), strict=True))


def tiny_char_policy():
    """A 2-layer Qwen2-shaped policy over the built-in character vocabulary, seeded (0)."""
    import torch

    from respec.engine.config import ModelConfig
    from respec.engine.model import CausalLM
    from respec.engine.tokenizer import char_tokenizer

    torch.manual_seed(0)
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=char_tokenizer().vocab_size, hidden_size=16,
                         head_dim=4, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, attention_bias=True)
    return CausalLM(config).eval()
