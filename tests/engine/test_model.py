"""The model matches transformers' own Qwen2 / Llama, and cached passes match the plain one."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from respec.engine.checkpoint import load_model, save_model
from respec.engine.errors import CacheFullError, CheckpointError
from respec.engine.kv_cache import KVCache
from respec.engine.tree import DraftTree

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def hf_checkpoint(tmp_path, family="qwen2", **overrides):
    torch.manual_seed(0)
    kwargs = {**BASE, **overrides}
    if family == "qwen2":
        config = transformers.Qwen2Config(**kwargs)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(config)
    for parameter in model.parameters():  # HF inits biases to 0; make every weight count
        torch.nn.init.normal_(parameter, std=0.2)
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path / family, max_shard_size=overrides.pop("_shard", "2GB"))
    return model.eval(), tmp_path / family


@pytest.mark.parametrize("family, overrides", [
    ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
])
def test_logits_match_transformers(tmp_path, family, overrides):
    reference, directory = hf_checkpoint(tmp_path, family, **overrides)
    ours = load_model(directory)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        want = reference(tokens).logits
        got = ours(tokens).logits
    assert (got - want).abs().max() < 1e-4


def test_sharded_checkpoint_and_save_round_trip(tmp_path):
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE))
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path / "sharded")
    again = load_model(save_model(ours, tmp_path / "saved"))
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, again(tokens).logits)
        assert (ours(tokens).logits - reference.eval()(tokens).logits).abs().max() < 1e-4


@pytest.fixture
def model(tmp_path):
    return load_model(hf_checkpoint(tmp_path)[1])


def test_cached_decode_matches_the_plain_forward_with_rows_at_different_lengths(model):
    cache = KVCache(model.config, slots=3, max_len=64)
    prompts = [torch.randint(0, 97, (n,)) for n in (5, 9, 2)]
    slots = [cache.allocate() for _ in prompts]
    full = [torch.cat([p, torch.randint(0, 97, (6,))]) for p in prompts]
    with torch.no_grad():
        for slot, prompt in zip(slots, prompts, strict=True):  # prefill one by one
            model.forward_cached(prompt[None], cache, torch.tensor([slot]))
            cache.commit(torch.tensor([slot]), [torch.arange(len(prompt))])
        for step in range(6):  # then decode the three rows together, each at its own position
            tokens = torch.stack([f[len(p) + step] for f, p in zip(full, prompts, strict=True)])[:, None]
            logits = model.forward_cached(tokens, cache, torch.tensor(slots)).logits[:, -1]
            cache.commit(torch.tensor(slots), [torch.arange(1)] * 3)
            for row, (f, p) in enumerate(zip(full, prompts, strict=True)):
                want = model(f[None, : len(p) + step + 1]).logits[0, -1]
                assert (logits[row] - want).abs().max() < 1e-4


def test_tree_verification_matches_each_path_and_commit_keeps_the_accepted_one(model):
    prefix = torch.randint(0, 97, (7,))
    tree = DraftTree.from_parents(torch.tensor([[11, 12, 13, 14, 15]]), torch.tensor([[-1, -1, 0, 0, 2]]))
    root = torch.tensor([42])
    inputs = tree.verify_tokens(root)  # [1, 6]: root then nodes
    cache = KVCache(model.config, slots=1, max_len=32)
    slot = torch.tensor([cache.allocate()])
    with torch.no_grad():
        model.forward_cached(prefix[None], cache, slot)
        cache.commit(slot, [torch.arange(7)])
        logits = model.forward_cached(inputs, cache, slot, tree_mask=tree.attention_mask()).logits[0]
        for position in range(6):  # each node's logits equal running its root-to-node path
            path = [0] + [n + 1 for n in tree.path_to(0, position - 1)] if position else [0]
            sequence = torch.cat([prefix, inputs[0, path]])
            want = model(sequence[None]).logits[0, -1]
            assert (logits[position] - want).abs().max() < 1e-4, position
        cache.commit(slot, [torch.tensor([0, 1, 3, 5])])  # root, node0, node2, node4
        after = model.forward_cached(torch.tensor([[7]]), cache, slot).logits[0, -1]
        sequence = torch.cat([prefix, torch.tensor([42, 11, 13, 15, 7])])
        assert (after - model(sequence[None]).logits[0, -1]).abs().max() < 1e-4


def test_checkpoint_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    directory = save_model(model, tmp_path / "m")
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="'GPT2LMHeadModel' is not supported"):
        load_model(directory)
    (directory / "config.json").write_text(json.dumps({**raw, "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(directory)
    (directory / "config.json").write_text(json.dumps(raw))
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(directory)


def test_prompt_longer_than_the_cache_is_a_clear_error(model):
    cache = KVCache(model.config, slots=2, max_len=8)
    slot = torch.tensor([cache.allocate()])
    with pytest.raises(CacheFullError, match="needs 12 cache positions; the cache holds 8"):
        model.forward_cached(torch.zeros(1, 12, dtype=torch.long), cache, slot)
    cache.allocate()
    with pytest.raises(CacheFullError, match="all 2 cache slots"):
        cache.allocate()
