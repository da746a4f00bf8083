"""Tiny random Hugging Face checkpoints for tests, built on the fly (nothing downloaded).

Every weight is drawn with `std` (transformers initialises biases and norms to constants),
so each tensor influences the logits and a wrong mapping or a wrong rule shows up.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

HF_CLASSES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}


def random_checkpoint(directory: Path, family: str = "qwen2", seed: int = 0, std: float = 0.2,
                      shard_size: str | None = None, **config):
    """(transformers model, eval mode, eager attention; its save directory)."""
    torch.manual_seed(seed)
    config_class, model_class = HF_CLASSES[family]
    model = model_class(config_class(**config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    model.config._attn_implementation = "eager"
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    return model.eval(), Path(directory)


def small_qwen2(directory: Path, vocab: int = 40, hidden: int = 32, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, seed: int = 0, std: float = 0.2) -> Path:
    """The small Qwen2 shape most engine and graph tests use; returns its directory."""
    return random_checkpoint(directory, seed=seed, std=std, vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads)[1]
