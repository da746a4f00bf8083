from __future__ import annotations

import math

import pytest
import torch
import transformers

from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.ngram import NgramDrafter
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample, _pad


def tiny(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "m")
    return load_model(tmp_path / "m")


def response_logprob(model, prompt, response):
    with torch.no_grad():
        tokens = torch.cat([prompt, response])[None]
        logp = torch.log_softmax(model(tokens).logits[0, :-1], -1)
        return float(logp[torch.arange(len(prompt) - 1, len(tokens[0]) - 1), response].sum())


def samples_for(model, prompt, responses, rewards):
    out = []
    for response, reward in zip(responses, rewards, strict=True):
        with torch.no_grad():
            tokens = torch.cat([prompt, response])[None]
            logp = torch.log_softmax(model(tokens).logits[0, :-1], -1)
            behaviour = logp[torch.arange(len(prompt) - 1, tokens.shape[1] - 1), response]
        out.append(TrainSample(prompt, response, behaviour, reward, "g"))
    return out


def test_grpo_steps_move_probability_toward_rewarded_responses(tmp_path):
    model = tiny(tmp_path)
    prompt = torch.tensor([1, 2, 3])
    good, bad = torch.tensor([5, 6]), torch.tensor([7, 8])
    before = response_logprob(model, prompt, good), response_logprob(model, prompt, bad)
    trainer = GRPOTrainer(model, TrainerConfig(lr=3e-3, micro_batch=2))
    for _ in range(5):
        stats = trainer.step(samples_for(model, prompt, [good, bad, good, bad], [1.0, 0.0, 1.0, 0.0]))
    after = response_logprob(model, prompt, good), response_logprob(model, prompt, bad)
    assert after[0] > before[0] + 1.0 and after[1] < before[1] - 1.0
    assert trainer.version == 5 and stats["reward_mean"] == 0.5


def test_first_step_is_on_policy_and_micro_batching_does_not_change_the_update(tmp_path):
    prompt = torch.tensor([1, 2, 3])
    responses = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([4, 4]), torch.tensor([8, 2, 2, 2])]
    results = []
    # micro 2: rows grouped by length and cut to the group's longest; multiple 5: lengths padded up to 5 or 10
    for micro, multiple in ((1, 1), (2, 1), (4, 1), (2, 5)):
        model = tiny(tmp_path)
        trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3, micro_batch=micro, length_multiple=multiple))
        stats = trainer.step(samples_for(model, prompt, responses, [1.0, 0.0, 0.5, 0.2]))
        assert abs(stats["ratio_mean"] - 1.0) < 1e-5 and abs(stats["behaviour_weight_mean"] - 1.0) < 1e-5
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert all(torch.allclose(results[0], other, atol=1e-6) for other in results[1:])


def test_one_epoch_updates_as_with_a_pass_for_the_proximal_logprobs(tmp_path, monkeypatch):
    """With one epoch the proximal log-probs are the trained weights' own (detached): the
    update without their extra pass equals the one with it, also with stale behaviour
    log-probs (ratio clipping and the behaviour weight both in play)."""
    prompt = torch.tensor([1, 2, 3])
    responses = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([4, 4]), torch.tensor([8, 2, 2, 2])]
    results = []
    for separate_pass in (False, True):
        model = tiny(tmp_path)
        samples = samples_for(model, prompt, responses, [1.0, 0.0, 0.5, 0.2])
        stale = [TrainSample(s.prompt, s.response, s.behaviour_logprobs - 0.3, s.reward, s.group_id) for s in samples]
        trainer = GRPOTrainer(model, TrainerConfig(lr=1e-2, micro_batch=2))
        monkeypatch.setattr(trainer, "_proximal_pass", lambda separate_pass=separate_pass: separate_pass)
        for _ in range(3):
            stats = trainer.step(stale)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), stats))
    (ours, our_stats), (theirs, their_stats) = results
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert our_stats["behaviour_weight_mean"] == pytest.approx(their_stats["behaviour_weight_mean"], abs=1e-5)


def test_the_step_statistics_cover_every_micro_batch(tmp_path):
    """behaviour_weight_mean is over all the step's tokens whatever the micro-batching: the
    metric that says whether the generator's log-probabilities match the trainer's."""
    prompt = torch.tensor([1, 2, 3])
    responses = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([4, 4]), torch.tensor([8, 2, 2, 2])]
    shifts = [0.1, 0.2, 0.3, 0.4]  # behaviour log-probs this much below the trainer's: weight exp(shift)
    expected = sum(len(r) * math.exp(d) for r, d in zip(responses, shifts, strict=True)) / 10
    for micro in (1, 4):
        model = tiny(tmp_path)
        samples = samples_for(model, prompt, responses, [1.0, 0.0, 0.5, 0.2])
        stale = [TrainSample(s.prompt, s.response, s.behaviour_logprobs - d, s.reward, s.group_id)
                 for s, d in zip(samples, shifts, strict=True)]
        stats = GRPOTrainer(model, TrainerConfig(lr=0.0, micro_batch=micro)).step(stale)
        assert stats["behaviour_weight_mean"] == pytest.approx(expected, rel=1e-5)


def test_a_step_with_no_samples_publishes_a_version_and_leaves_the_weights(tmp_path):
    model = tiny(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3))
    stats = trainer.step([])  # every rollout of the step was refused by the Generator
    assert trainer.version == 1 and stats["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_non_finite_gradient_skips_the_step_and_leaves_the_optimiser_usable(tmp_path):
    """A NaN behaviour log-prob (or any non-finite loss) must not reach the weights, nor
    AdamW's moments: with them poisoned every later step would write NaN too."""
    model = tiny(tmp_path)
    prompt, good, bad = torch.tensor([1, 2, 3]), torch.tensor([5, 6]), torch.tensor([7, 8])
    trainer = GRPOTrainer(model, TrainerConfig(lr=3e-3, micro_batch=2))
    poisoned = samples_for(model, prompt, [good, bad], [1.0, 0.0])
    poisoned[0] = TrainSample(prompt, good, torch.full((2,), float("nan")), 1.0, "g")
    before = [p.detach().clone() for p in model.parameters()]
    stats = trainer.step(poisoned)
    assert stats["skipped"] == 1.0 and trainer.version == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    was = response_logprob(model, prompt, good)
    for _ in range(3):
        stats = trainer.step(samples_for(model, prompt, [good, bad], [1.0, 0.0]))
    assert stats["skipped"] == 0.0 and response_logprob(model, prompt, good) > was + 0.5
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("speculative", [False, True])
def test_trainer_recomputes_the_engines_behaviour_logprobs(tmp_path, temperature, speculative):
    """On-policy tokens must have ratio 1: the trainer's log-probabilities (same weights,
    same temperature, response tokens only) equal what the engine recorded when it sampled
    them, with plain decoding and with speculative decoding. Else clipping silently cuts
    the update."""
    model = tiny(tmp_path)
    drafter = NgramDrafter() if speculative else None
    engine = SpeculativeEngine(model, drafter, max_rows=4, max_len=40, seed=3)
    prompts = [torch.tensor([1, 2, 3, 4, 2, 3]), torch.tensor([5, 6, 5, 6]), torch.tensor([7, 1, 7, 1, 7])]
    rows = engine.generate(prompts, Sampling(temperature=temperature, max_new_tokens=12),
                           DraftShape.chain(3) if speculative else None)
    samples = [TrainSample(row.prompt, torch.tensor(row.tokens), torch.tensor(row.logprobs), 0.0, "g",
                           temperature=temperature) for row in rows]
    batch = _pad(samples)
    with torch.no_grad():
        recomputed = GRPOTrainer._logprobs(model, batch)
    assert batch.mask.sum() == sum(len(row.tokens) for row in rows)
    assert torch.allclose(recomputed[batch.mask], batch.behaviour[batch.mask], atol=1e-5)


def test_gain_lr_with_lr_0_trains_the_norm_gains_only(tmp_path):
    model = tiny(tmp_path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompt = torch.tensor([1, 2, 3])
    trainer = GRPOTrainer(model, TrainerConfig(lr=0.0, gain_lr=1e-2, micro_batch=4))
    trainer.step(samples_for(model, prompt, [torch.tensor([5, 6]), torch.tensor([7, 8])], [1.0, 0.0]))
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    gains = {name for name in before if name.endswith("norm.weight")}
    assert moved == gains and len(gains) == 5  # 2 per layer + the final norm


def test_gain_lr_is_the_gains_lr_and_lr_the_rest(tmp_path):
    model = tiny(tmp_path)
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-4, gain_lr=1e-2))
    lrs = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert lrs[id(parameter)] == (1e-2 if name.endswith("norm.weight") else 1e-4), name


def test_captured_pass_is_the_weights_before_the_update_and_changes_nothing(tmp_path):
    """With capture_layers the update keeps, for every sample exactly once, the hidden states
    and logits its forward pass computed: those of the weights before the update, at each
    real token (fails if rows are mislabelled, padding counted as real, or the pass is taken
    after the step); and the update itself is the one without capture."""
    prompt = torch.tensor([1, 2, 3])
    responses = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([4, 4]), torch.tensor([8, 2, 2, 2])]
    before = tiny(tmp_path)
    samples = samples_for(before, prompt, responses, [1.0, 0.0, 1.0, 0.0])
    plain, capturing = tiny(tmp_path), tiny(tmp_path)
    GRPOTrainer(plain, TrainerConfig(lr=1e-2, micro_batch=2, length_multiple=4)).step(samples)
    trainer = GRPOTrainer(capturing, TrainerConfig(lr=1e-2, micro_batch=2, length_multiple=4, capture_layers=(0, 1)))
    trainer.step(samples)
    for a, b in zip(plain.parameters(), capturing.parameters(), strict=True):
        assert torch.equal(a, b)
    seen = []
    for view in trainer.captured:
        for i, row in enumerate(view.rows.tolist()):
            seen.append(row)
            tokens = torch.cat([samples[row].prompt, samples[row].response])
            assert view.valid[i].sum() == len(tokens) and torch.equal(view.tokens[i, : len(tokens)], tokens)
            with torch.no_grad():
                reference = before(tokens[None], capture_layers=(0, 1))
            torch.testing.assert_close(view.logits[i, : len(tokens)], reference.logits[0])
            torch.testing.assert_close(view.features[i, : len(tokens)], torch.cat(reference.captured, dim=-1)[0])
    assert sorted(seen) == [0, 1, 2, 3]


def test_fused_adamw_only_where_every_parameter_is_on_a_gpu(tmp_path):
    """On the CPU the optimiser keeps PyTorch's default kernels (the fused one is for GPUs)."""
    trainer = GRPOTrainer(tiny(tmp_path), TrainerConfig(fused_adamw=True))
    assert not trainer.optimizer.defaults.get("fused")


@pytest.mark.parametrize("bf16_on_gpu", [True, False])
def test_an_update_runs_under_bf16_autocast_on_a_gpu_only(tmp_path, monkeypatch, bf16_on_gpu):
    """The passes of an update run inside torch.autocast(bf16), enabled where the weights are
    on a GPU and bf16_on_gpu is set (plain float32 made the first GPU run of the actor
    graph trainer-bound): here, on the CPU, entered but disabled; and the device it reads
    is the model's. Fails if the update leaves autocast out or enables it on a CPU."""
    import respec.rl.trainer as trainer_module

    entered = []
    real = torch.autocast

    def recording(device_type, dtype=None, enabled=True):
        entered.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled)

    monkeypatch.setattr(trainer_module.torch, "autocast", recording)
    model = tiny(tmp_path)
    prompt, response = torch.tensor([1, 2, 3]), torch.tensor([5, 6])
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3, micro_batch=2, bf16_on_gpu=bf16_on_gpu))
    trainer.step(samples_for(model, prompt, [response, response], [1.0, 0.0]))
    assert entered == [("cpu", torch.bfloat16, False)]
