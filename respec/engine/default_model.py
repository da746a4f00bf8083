"""The embedded default policy: a tiny Qwen2-shaped model over the character tokenizer.

``create_default_checkpoint`` writes an untrained (randomly initialised) checkpoint
directory that loads like any Hugging Face one: ``config.json`` + ``model.safetensors``
(``load_model``), ``tokenizer.json`` (``load_tokenizer``) and ``generation_config.json``.
Training it is ``respec prepare``'s job, not this module's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from respec.engine.checkpoint import save_model
from respec.engine.config import ModelConfig
from respec.engine.model import CausalLM
from respec.engine.tokenizer import char_tokenizer

INIT_STD = 0.02  # GPT-2 / Qwen2's initializer_range: small enough that training starts stable


def tiny_policy_config(vocab_size: int, bos_id: int | None = None, eos_id: int | None = None,
                       pad_id: int | None = None) -> ModelConfig:
    """Qwen2 shape: hidden 256, 4 layers, 4 heads (head_dim 64), 2 KV heads, MLP 704,
    tied embeddings, rope_theta 10000, 512 positions.

    With the character tokenizer (87 tokens) that is 2,975,744 parameters:
    embeddings 87*256 = 22,272 (shared with lm_head), per layer 738,304
    (q 65,792 + k 32,896 + v 32,896 with biases, o 65,536, MLP 3*256*704 = 540,672,
    two norms 512), four layers 2,953,216, final norm 256.
    """
    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=10000.0,
        attention_bias=True,  # Qwen2 always has q/k/v biases
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=bos_id,
        eos_token_ids=(eos_id,) if eos_id is not None else (),
        pad_token_id=pad_id,
    )


DEFAULT_PARAMETER_COUNT = 2_975_744  # tiny_policy_config(char_tokenizer().vocab_size); see its docstring


def create_default_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write the randomly initialised default policy and its tokenizer to `directory`."""
    directory = Path(directory)
    tokenizer = char_tokenizer()
    config = tiny_policy_config(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    torch.manual_seed(seed)
    model = CausalLM(config)
    initialise(model)
    save_model(model, directory)
    tokenizer.save(directory)
    _write_generation_config(directory, config)
    return directory


def initialise(model: CausalLM) -> None:
    """Normal(0, INIT_STD) weights, zero biases, unit norms (PyTorch's own defaults give
    the tied embedding/lm_head std 1, which makes the first logits huge)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters: a tied embedding/lm_head matrix is counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already skips shared tensors


def _write_generation_config(directory: Path, config: ModelConfig) -> None:
    """What transformers' generate() reads for stopping; the engine reads eos from config.json."""
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
