"""The embedded default policy's checkpoint: loads with both loaders, documented size, runs."""

from __future__ import annotations

import json

import torch

from respec.engine.checkpoint import load_model
from respec.engine.default_model import (
    DEFAULT_PARAMETER_COUNT,
    create_default_checkpoint,
    parameter_count,
    tiny_policy_config,
)
from respec.engine.tokenizer import char_tokenizer, check_tokenizer_matches, load_tokenizer


def test_default_checkpoint_loads_and_runs(tmp_path):
    create_default_checkpoint(tmp_path, seed=0)
    model, tokenizer = load_model(tmp_path), load_tokenizer(tmp_path)
    check_tokenizer_matches(tokenizer, model.config)
    assert parameter_count(model) == DEFAULT_PARAMETER_COUNT
    assert model.config.eos_token_id == tokenizer.eos_id == 2
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_id
    tokens = torch.tensor([tokenizer.encode("12+7*3=7*3=21;12+21=33;A:33", add_bos=True)])
    logits = model(tokens).logits
    assert logits.shape == (1, tokens.shape[1], tokenizer.vocab_size)
    assert torch.isfinite(logits).all() and logits.abs().max() < 5  # std-0.02 init: near-uniform start


def test_same_seed_same_weights(tmp_path):
    create_default_checkpoint(tmp_path / "a", seed=3)
    create_default_checkpoint(tmp_path / "b", seed=3)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_config_is_a_few_million_parameter_qwen2():
    config = tiny_policy_config(char_tokenizer().vocab_size)
    assert config.family == "qwen2" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (256, 4, 2)
    assert 1_000_000 < DEFAULT_PARAMETER_COUNT < 10_000_000
