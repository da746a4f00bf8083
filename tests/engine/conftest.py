"""Fixtures for the model-side tests: tiny random Hugging Face checkpoints built on the fly.

Weights are drawn with std 0.2 (HF initialises biases and norms to constants), so every
tensor, bias and norm weight influences the logits and a wrong mapping shows up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.model import CausalLM
from tests.checkpoints import random_checkpoint

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build_hf_checkpoint(
    directory: Path, family: str = "qwen2", shard_size: str | None = None, seed: int = 0, **overrides
):
    """(transformers model in eval mode with eager attention, its save directory)."""
    return random_checkpoint(directory, family, seed, 0.2, shard_size, **{**TINY, **overrides})


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A factory: hf_checkpoint(family="qwen2", shard_size=None, **config) -> (hf_model, dir)."""
    count = iter(range(1000))

    def build(family: str = "qwen2", shard_size: str | None = None, **overrides):
        return build_hf_checkpoint(tmp_path / f"{family}{next(count)}", family, shard_size, **overrides)

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 (GQA, untied) checkpoint directory, shared by the session: read only."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2")[1]


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint) -> CausalLM:
    """Our model loaded from ``tiny_checkpoint``; tests must not change its weights."""
    return load_model(tiny_checkpoint)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, then restore. On a small shared CPU, tiny matmuls
    spread over two threads wait on each other (measured: 300 ms vs 1 ms per forward of the
    tiny model while other processes were busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
