"""Tiny tied-embedding Qwen2 policies for the vLLM tests, and respec's side of each check.

Shapes: vLLM's CPU attention takes head sizes 32, 64, ... (not the 8 of tests/checkpoints'
small_qwen2), hence hidden 64 over 2 heads. Tied embeddings, as in respec's tiny policy:
the case where an in-place reload needs the lm_head re-pack (respec/interop/vllm_worker.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from respec.engine.checkpoint import load_model
from respec.engine.sampling import behaviour_logprobs
from respec.engine.speculative import SpeculativeEngine
from respec.engine.target import Sampling
from tests.checkpoints import random_checkpoint

VOCAB = 48


def tiny_policy(directory: Path, seed: int = 0) -> Path:
    return random_checkpoint(directory, seed=seed, std=0.2, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             tie_word_embeddings=True, max_position_embeddings=256)[1]


def char_policy(directory: Path) -> Path:
    """A tiny random policy with the built-in character tokenizer beside it (what
    PromptSource, RewardScorer and PolicyTrainer read), for graph runs."""
    from respec.engine.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    random_checkpoint(directory, seed=0, std=0.1, vocab_size=tokenizer.vocab_size, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    tokenizer.save(directory)
    return directory


def perturbed(source: Path, target: Path, scale: float = 0.3, seed: int = 1) -> Path:
    """Another policy version: every tensor plus Gaussian noise (0.3 x its std)."""
    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(source / "model.safetensors"))
    noisy = {name: t + scale * t.float().std() * torch.randn(t.shape, generator=generator) for name, t in tensors.items()}
    save_file(noisy, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def respec_greedy(directory: Path, prompts: list[list[int]], max_new: int) -> list[dict]:
    """respec's own engine, greedy, no drafter: tokens and behaviour log-probs per prompt."""
    model = load_model(directory)
    engine = SpeculativeEngine(model, None, max_rows=len(prompts), max_len=256)
    rows = engine.generate([torch.tensor(p) for p in prompts], Sampling(temperature=0.0, max_new_tokens=max_new))
    return [{"tokens": list(r.tokens), "logprobs": list(r.logprobs)} for r in rows]


def respec_logits(directory: Path, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response), V] float32: the logits respec's model gives before each response token."""
    model = load_model(directory)
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(tokens).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(response)].float()


def respec_behaviour(directory: Path, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    logits = respec_logits(directory, prompt, response)
    return behaviour_logprobs(logits, torch.tensor(response), torch.full((len(response),), temperature))
