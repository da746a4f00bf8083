"""Checkpoint directories: configs of real model families, save/load round trips, and every
way a checkpoint can be broken, each with an error naming the file and what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from respec.engine.checkpoint import INDEX_FILE, SINGLE_FILE, load_model, load_weights, save_model
from respec.engine.config import ModelConfig, RopeScaling
from respec.engine.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread")

# Abridged from the config.json files these models ship with.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}


def test_real_family_configs_are_read():
    qwen = ModelConfig.from_dict(QWEN25_05B)
    assert (qwen.head_dim, qwen.num_key_value_heads, qwen.tie_word_embeddings) == (64, 2, True)
    assert qwen.attention_bias and not qwen.output_bias and qwen.rope_theta == 1e6
    assert qwen.eos_token_ids == (151645,) and qwen.rope_scaling is None
    llama = ModelConfig.from_dict(LLAMA31_8B)
    assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert llama.eos_token_ids == (128001, 128008, 128009) and llama.eos_token_id == 128001
    assert not llama.attention_bias and llama.head_dim == 128
    for config in (qwen, llama):  # to_hf_dict is read back as the same config
        assert ModelConfig.from_dict(config.to_hf_dict()) == config


def test_transformers_5_rope_parameters_are_read(hf_checkpoint):
    _, directory = hf_checkpoint("llama", rope_theta=250000.0, rope_scaling={"rope_type": "linear", "factor": 3.0})
    assert "rope_parameters" in json.loads((directory / "config.json").read_text())
    config = ModelConfig.from_file(directory)
    assert config.rope_theta == 250000.0 and config.rope_scaling == RopeScaling("linear", 3.0)


@pytest.mark.parametrize("tied, shard_bytes", [(False, None), (True, None), (False, 30_000)])
def test_save_then_load_gives_the_same_model_and_transformers_reads_it(hf_checkpoint, tmp_path, tied, shard_bytes):
    _, directory = hf_checkpoint("qwen2", tie_word_embeddings=tied)
    ours = load_model(directory)
    saved = save_model(ours, tmp_path / "saved", max_shard_bytes=shard_bytes)
    assert (saved / INDEX_FILE).exists() == (shard_bytes is not None)
    if not shard_bytes:
        assert ("lm_head.weight" in load_file(saved / SINGLE_FILE)) == (not tied)
    again = load_model(saved)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, ours(tokens).logits)
        assert float((theirs(tokens).logits - ours(tokens).logits).abs().max()) < 1e-4
    if tied:
        assert again.lm_head.weight is again.model.embed_tokens.weight


def test_saving_over_a_sharded_checkpoint_leaves_no_stale_index(hf_checkpoint, tmp_path):
    ours = load_model(hf_checkpoint("qwen2")[1])
    save_model(ours, tmp_path / "m", max_shard_bytes=30_000)
    save_model(ours, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", SINGLE_FILE]


def test_load_in_bfloat16_and_load_weights_into_a_model(tiny_checkpoint, tmp_path):
    half = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16
    model = load_model(tiny_checkpoint)
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    load_weights(model, tiny_checkpoint)
    assert torch.equal(model.model.norm.weight, load_model(tiny_checkpoint).model.norm.weight)


@pytest.mark.parametrize("tied, shard_bytes", [(False, None), (True, 30_000)])
def test_without_decoder_layers_only_the_head_parts_are_read(hf_checkpoint, tmp_path, tied, shard_bytes):
    full = load_model(hf_checkpoint("qwen2", tie_word_embeddings=tied)[1])
    directory = save_model(full, tmp_path / "m", max_shard_bytes=shard_bytes)
    parts = load_model(directory, decoder_layers=False)
    assert all(p.is_meta for p in parts.model.layers.parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(parts.state_dict()[name], full.state_dict()[name])
    assert (parts.lm_head.weight is parts.model.embed_tokens.weight) == tied


def test_without_decoder_layers_every_tensor_is_still_checked(broken):
    directory, config = broken
    rewrite_config(directory, {**config, "intermediate_size": 128})
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.down_proj.weight' has shape"):
        load_model(directory, decoder_layers=False)


# ---------------------------------------------------------------------- broken checkpoints


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint, with its config as a dict."""
    directory = save_model(load_model(tiny_checkpoint), tmp_path / "copy")
    return directory, json.loads((directory / "config.json").read_text())


def rewrite_config(directory, config):
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint directory not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config.json: config.json not found"):
        load_model(tmp_path)


def test_missing_weights_file(broken):
    directory, _ = broken
    (directory / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {SINGLE_FILE} or {INDEX_FILE}"):
        load_model(directory)


def test_missing_shard(hf_checkpoint):
    _, directory = hf_checkpoint("qwen2", shard_size="60KB")
    victim = sorted(directory.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard named in {INDEX_FILE} not found"):
        load_model(directory)


def test_unsupported_architecture_and_rope_scaling(broken):
    directory, config = broken
    rewrite_config(directory, {**config, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="config.json: architecture 'GPT2LMHeadModel' is not supported"):
        load_model(directory)
    rewrite_config(directory, {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn' is not supported"):
        load_model(directory)
    rewrite_config(directory, {**config, "rope_scaling": {"rope_type": "llama3", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="rope_scaling: missing key 'low_freq_factor'"):
        load_model(directory)


def test_missing_or_mistyped_config_key(broken):
    directory, config = broken
    rewrite_config(directory, {k: v for k, v in config.items() if k != "num_hidden_layers"})
    with pytest.raises(CheckpointError, match="config.json: missing key 'num_hidden_layers'"):
        load_model(directory)
    rewrite_config(directory, {**config, "hidden_size": "64"})
    with pytest.raises(CheckpointError, match="key 'hidden_size' must be an int >= 1, got '64'"):
        load_model(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(directory)


def test_tensor_shape_mismatch(broken):
    directory, config = broken
    rewrite_config(directory, {**config, "intermediate_size": 128})
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\) "
        r"but config.json implies \(64, 128\)",
    ):
        load_model(directory)


def test_missing_and_unexpected_tensors(broken):
    directory, _ = broken
    tensors = load_file(directory / SINGLE_FILE)
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, directory / SINGLE_FILE)
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'model.norm.weight' is missing"):
        load_model(directory)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, directory / SINGLE_FILE)
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.extra.weight'"):
        load_model(directory)
    rotary = "model.layers.0.self_attn.rotary_emb.inv_freq"  # old Llama checkpoints: ignored
    save_file({**tensors, rotary: torch.zeros(8)}, directory / SINGLE_FILE)
    load_model(directory)


def test_corrupt_safetensors_file(broken):
    directory, _ = broken
    (directory / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(directory)
