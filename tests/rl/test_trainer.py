from __future__ import annotations

import torch
import transformers

from respec.engine.checkpoint import load_model
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample


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
    for micro in (1, 4):
        model = tiny(tmp_path)
        trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3, micro_batch=micro))
        stats = trainer.step(samples_for(model, prompt, responses, [1.0, 0.0, 0.5, 0.2]))
        assert abs(stats["ratio_mean"] - 1.0) < 1e-5 and abs(stats["behaviour_weight_mean"] - 1.0) < 1e-5
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_a_step_with_no_samples_publishes_a_version_and_leaves_the_weights(tmp_path):
    model = tiny(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPOTrainer(model, TrainerConfig(lr=1e-3))
    stats = trainer.step([])  # every rollout of the step was refused by the Generator
    assert trainer.version == 1 and stats["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
